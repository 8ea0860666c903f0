"""SQLite result store: every answer is kept under a key that changes when any input
that could change the answer changes (stamp pixels, task, engine settings).

A run looks rows up here before asking an engine and writes each answer here before it
reports it, so a killed run loses nothing and a rerun repeats no paid call. WAL mode
keeps committed rows safe across ``kill -9`` and lets a panel and a CLI share one file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .backends.base import Backend, Prediction
from .tasks import Task

__all__ = ["ResultStore", "StoreError", "default_store_path", "run_context", "stamp_key"]

SCHEMA_VERSION = 1
_LOOKUP_CHUNK = 500  # stays under SQLite's host-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    label TEXT,
    probabilities TEXT,
    raw_text TEXT NOT NULL DEFAULT '',
    error TEXT,
    method TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS store_info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS open_batches (
    request TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class StoreError(RuntimeError):
    """The store cannot be used; the message says which file and what to do."""


def default_store_path() -> Path:
    """``$GLUE_VLM_STORE`` if set, else ``results.sqlite`` in the user's cache dir."""
    env = os.environ.get("GLUE_VLM_STORE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("glue-vlm")) / "results.sqlite"


def run_context(task: Task, backend: Backend) -> bytes:
    """Digest of everything but the pixels that goes into a key."""
    payload = json.dumps({"task": task.fingerprint(), "engine": backend.settings()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).digest()


def stamp_key(context: bytes, pixels: np.ndarray) -> str:
    """Key of one stamp's answer: the run context plus the uint8 pixels and shape."""
    digest = hashlib.sha256(context)
    digest.update(repr(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).data)
    return digest.hexdigest()


class ResultStore:
    """Answers by key. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        #: set when a damaged store file was moved aside: what happened, for the user
        self.notice: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect_when_free()
        except sqlite3.DatabaseError as exc:
            if not self._is_damage(exc):
                raise StoreError(f"cannot open the result store {self.path}: {exc}; pass "
                                 "another path (--store) or free the disk") from None
            aside = self._set_aside()
            self.notice = (f"the result store {self.path} was damaged ({exc}); it was "
                           f"moved to {aside.name} and a new store was started")
            self._db = self._connect()
        except OSError as exc:
            raise StoreError(f"cannot open the result store {self.path}: {exc}; pass "
                             "another path (--store)") from None

    def _connect_when_free(self, patience: float = 30.0) -> sqlite3.Connection:
        """Connect, waiting while another process holds the file: switching a new file
        to WAL can report "locked" at once, without waiting on the busy timeout."""
        deadline = time.monotonic() + patience
        while True:
            try:
                return self._connect()
            except sqlite3.OperationalError as exc:
                text = str(exc).lower()
                if ("locked" not in text and "busy" not in text) or \
                        time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            problems = db.execute("PRAGMA quick_check").fetchall()
            if problems != [("ok",)]:
                raise sqlite3.DatabaseError("integrity check failed: "
                                            + "; ".join(str(p[0]) for p in problems[:3]))
            db.execute("INSERT OR IGNORE INTO store_info VALUES ('schema', ?)",
                       (str(SCHEMA_VERSION),))
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _is_damage(exc: sqlite3.DatabaseError) -> bool:
        text = str(exc).lower()
        return any(word in text for word in ("not a database", "malformed",
                                             "integrity check", "corrupt"))

    def _set_aside(self) -> Path:
        aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)
        return aside

    # -- reading --------------------------------------------------------------------
    def _select_where_in(self, query: str, values: Sequence[str]) -> list[tuple]:
        """Rows of ``query`` (whose ``IN ({})`` takes ``values``), in chunks that stay
        under SQLite's host-parameter limit."""
        rows: list[tuple] = []
        for start in range(0, len(values), _LOOKUP_CHUNK):
            chunk = list(values[start:start + _LOOKUP_CHUNK])
            try:
                rows += self._db.execute(query.format(",".join("?" * len(chunk))),
                                         chunk).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the result store {self.path}: {exc}") from None
        return rows

    def get_many(self, keys: Sequence[str]) -> dict[str, Prediction]:
        """Stored predictions for those keys that have one."""
        rows = self._select_where_in(
            "SELECT key, label, probabilities, raw_text, error, method, prompt_tokens, "
            "completion_tokens FROM results WHERE key IN ({})", keys)
        return {key: Prediction(label=label,
                                probabilities=json.loads(probs) if probs else None,
                                raw_text=raw, error=error, method=method,
                                prompt_tokens=p_tok, completion_tokens=c_tok)
                for key, label, probs, raw, error, method, p_tok, c_tok in rows}

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    # -- writing --------------------------------------------------------------------
    def put_many(self, items: Iterable[tuple[str, Prediction]], task: Task,
                 backend: Backend) -> None:
        """Store predictions in one transaction (all or nothing)."""
        now = time.time()
        rows = [(key, task.slug, backend.name, backend.model, p.label,
                 json.dumps(p.probabilities) if p.probabilities is not None else None,
                 p.raw_text or "", p.error, p.method or "", int(p.prompt_tokens or 0),
                 int(p.completion_tokens or 0), now, now)
                for key, p in items]
        if not rows:
            return
        try:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(key) DO UPDATE SET label=excluded.label, "
                    "probabilities=excluded.probabilities, raw_text=excluded.raw_text, "
                    "error=excluded.error, method=excluded.method, "
                    "prompt_tokens=excluded.prompt_tokens, "
                    "completion_tokens=excluded.completion_tokens, updated=excluded.updated",
                    rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the result store {self.path}: {exc}; "
                             "answers of this batch were not kept: free the disk or "
                             "pass another path (--store) and run again") from None

    # -- open Batch API jobs (so a rerun collects a job instead of paying twice) ------
    def open_batches(self, requests: Sequence[str]) -> dict[str, str]:
        """The open batch job id of each request id that is in one."""
        return dict(self._select_where_in(
            "SELECT request, batch_id FROM open_batches WHERE request IN ({})", requests))

    def add_batch(self, batch_id: str, requests: Iterable[str]) -> None:
        """Remember that ``requests`` were submitted in job ``batch_id``."""
        now = time.time()
        try:
            with self._transaction():
                self._db.executemany("INSERT OR REPLACE INTO open_batches VALUES (?,?,?)",
                                     [(request, batch_id, now) for request in requests])
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the result store {self.path}: {exc}") from None

    def forget_batch(self, batch_id: str) -> None:
        """Job ``batch_id`` is over (its answers are collected or it failed)."""
        try:
            with self._transaction():
                self._db.execute("DELETE FROM open_batches WHERE batch_id = ?", (batch_id,))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the result store {self.path}: {exc}") from None

    @contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
