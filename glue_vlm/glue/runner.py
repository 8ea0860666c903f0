"""A classification run in a worker thread, with its results written on the main thread.

The worker gets plain inputs (row indices, a stamp source, a task, an engine factory, a
store path) and sends back plain objects through queued Qt signals; the main thread
records each batch and writes the catalog's columns in chunks, at most every
``flush_interval`` seconds (longer when writing is slow), so linked plots update during
the run without stalling the application.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from qtpy import QtCore

from ..backends.base import BackendError
from ..run import RunResult, classify
from ..stamps import StampError, StampSettings, StampSource
from ..store import ResultStore, StoreError
from ..tasks import Task, TaskError
from .columns import reached_positions, write_result, write_run
from .sources import GlueInputError

__all__ = ["RunPlan", "RunOutcome", "BackgroundRun", "USER_ERRORS", "one_line"]

#: errors whose message is written for the user: shown as they are, no traceback
USER_ERRORS = (BackendError, StampError, StoreError, TaskError, GlueInputError)


def one_line(exc: BaseException) -> str:
    """A readable one-line message for ``exc``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, USER_ERRORS):
        return text or type(exc).__name__
    return f"unexpected error: {type(exc).__name__}: {text}" if text else \
        f"unexpected error: {type(exc).__name__}"


@dataclass
class RunPlan:
    """Everything a run needs, fixed when Classify is pressed."""

    data: object                      # the glue catalog (written on the main thread only)
    rows: np.ndarray
    source: StampSource
    task: Task
    make_engine: Callable[[], object]  # called in the worker (may load a model)
    store_path: Path
    stamp_settings: StampSettings


@dataclass
class RunOutcome:
    """How a run ended: ``result`` when it finished or was cancelled, else ``error``
    (one line) and ``details`` (the traceback, for the curious)."""

    result: RunResult | None
    written: int
    error: str | None = None
    details: str = ""
    estimate: str = ""

    @property
    def cancelled(self) -> bool:
        return self.result is not None and self.result.cancelled


class _Worker(QtCore.QThread):
    batch = QtCore.Signal(object, object)
    progressed = QtCore.Signal(object)
    engine_ready = QtCore.Signal(object, object, str)
    ended = QtCore.Signal(object, str, str)

    def __init__(self, plan: RunPlan, cancel: threading.Event):
        super().__init__()
        self.plan = plan
        self.cancel = cancel

    def run(self):
        plan, engine, store = self.plan, None, None
        try:
            engine = plan.make_engine()
            store = ResultStore(plan.store_path)
            estimate = engine.estimate_cost(len(plan.rows), plan.task).describe()
            self.engine_ready.emit(engine, store, estimate)
            result = classify(plan.source, plan.rows, plan.task, engine, store=store,
                              stamp_settings=plan.stamp_settings,
                              progress=lambda p: self.progressed.emit(dataclasses.replace(p)),
                              on_batch=lambda pos, preds: self.batch.emit(pos, preds),
                              cancel=self.cancel)
            self.ended.emit(result, "", "")
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            details = "" if isinstance(exc, USER_ERRORS) else traceback.format_exc()
            self.ended.emit(None, one_line(exc), details)
        finally:
            if engine is not None:
                engine.close()
            if store is not None:
                store.close()


class BackgroundRun(QtCore.QObject):
    """One run. Connect to the signals, then :meth:`start`. ``finished`` comes once,
    after the catalog holds everything the run produced."""

    progressed = QtCore.Signal(object)   # Progress
    started_engine = QtCore.Signal(str)  # the engine's cost estimate
    written = QtCore.Signal(int)         # rows written to the catalog so far
    finished = QtCore.Signal(object)     # RunOutcome

    def __init__(self, plan: RunPlan, flush_interval: float = 0.3, parent=None):
        super().__init__(parent)
        self.plan = plan
        self.flush_interval = flush_interval
        self.cancel_event = threading.Event()
        self._mirror = RunResult.empty(plan.task, plan.rows)
        self._pending: list[np.ndarray] = []
        self._written = 0
        self._engine = self._store = None
        self._estimate = ""
        self._timer = QtCore.QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.flush)
        self._worker = _Worker(plan, self.cancel_event)
        self._worker.batch.connect(self._on_batch)
        # emitted in the worker thread: main-thread receivers get it queued, a
        # direct connection acts at once (e.g. cancel after so many rows)
        self._worker.progressed.connect(self.progressed, QtCore.Qt.DirectConnection)
        self._worker.engine_ready.connect(self._on_engine)
        self._worker.ended.connect(self._on_end)

    def start(self):
        self._worker.start()

    def cancel(self):
        """Stop after the current engine batch; what is done is kept. Thread-safe."""
        self.cancel_event.set()

    def is_running(self) -> bool:
        return self._worker.isRunning()

    def wait(self, ms: int = 60_000) -> bool:
        return self._worker.wait(ms)

    # -- main thread ----------------------------------------------------------------
    def _on_engine(self, engine, store, estimate):
        self._engine, self._store, self._estimate = engine, store, estimate
        self.started_engine.emit(estimate)

    def _on_batch(self, positions, predictions):
        for position, prediction in zip(positions, predictions):
            self._mirror.record(int(position), prediction)
        self._pending.append(np.asarray(positions, dtype=np.int64))
        if not self._timer.isActive():
            self._timer.start(int(self.flush_interval * 1000))

    def flush(self):
        """Write the answers received since the last flush into the catalog."""
        if not self._pending:
            return
        positions = np.concatenate(self._pending)
        self._pending = []
        began = time.perf_counter()
        write_result(self.plan.data, self._mirror, positions)
        spent = time.perf_counter() - began
        # keep writing (and the redraws it causes) to a small share of the main thread
        self.flush_interval = max(self.flush_interval, 10 * spent)
        self._written += len(positions)
        self.written.emit(self._written)

    def _on_end(self, result, error, details):
        self._timer.stop()
        self._pending = []
        outcome = RunOutcome(result=result, written=0, error=error or None,
                             details=details, estimate=self._estimate)
        answered = result if result is not None else self._mirror
        if self._engine is not None:
            try:
                write_run(self.plan.data, answered, self._engine, self._store,
                          stopped_by=error or None)
                outcome.written = len(reached_positions(answered))
            except Exception as exc:  # noqa: BLE001 - a broken catalog is reported too
                outcome.error = one_line(exc)
                outcome.details = traceback.format_exc()
        self._worker.wait()
        self.finished.emit(outcome)
