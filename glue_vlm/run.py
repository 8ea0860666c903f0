"""Orchestration: stamps -> store lookup -> engine batches -> store -> caller.

``classify`` streams: it holds one chunk of stamps at a time, and the per-row outputs
it keeps are small fixed-size arrays (code, probabilities, confidence).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .backends.base import Backend, Prediction, Usage
from .stamps import Stamp, StampSettings, StampSource, iter_stamps
from .store import ResultStore, run_context, stamp_key
from .tasks import Task

__all__ = ["Progress", "RunResult", "classify", "stamp_settings_for"]


@dataclass
class Progress:
    total: int
    done: int = 0
    cached: int = 0
    failed: int = 0
    elapsed: float = 0.0
    #: rows answered by the engine in this run (not from the store)
    called: int = 0

    @property
    def rate(self) -> float:
        """Rows per second over the run so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the engine's rate so far; None before the first answer."""
        if self.done >= self.total:
            return 0.0
        if not self.called or self.elapsed <= 0:
            return None
        return (self.total - self.done) * self.elapsed / self.called


@dataclass
class RunResult:
    """Per-row outcome, indexed by position in the ``rows`` that were classified."""

    task: Task
    rows: np.ndarray
    codes: np.ndarray            # int16, -1 = not classified
    probabilities: np.ndarray    # float32 (n, n_labels), NaN when unknown
    confidence: np.ndarray       # float32, NaN when unknown
    errors: dict[int, str] = field(default_factory=dict)  # position -> reason
    cancelled: bool = False
    usage: Usage = field(default_factory=Usage)
    progress: Progress | None = None

    @property
    def labels(self) -> np.ndarray:
        """Label per row as fixed-width text, ``unclassified`` where no label."""
        names = np.array(self.task.label_names + ["unclassified"])
        return names[self.codes]

    @classmethod
    def empty(cls, task: Task, rows: Sequence[int]) -> "RunResult":
        n = len(rows)
        return cls(task=task, rows=np.asarray(rows, dtype=np.int64),
                   codes=np.full(n, -1, dtype=np.int16),
                   probabilities=np.full((n, len(task.labels)), np.nan, dtype=np.float32),
                   confidence=np.full(n, np.nan, dtype=np.float32),
                   progress=Progress(total=n))

    def record(self, position: int, prediction: Prediction) -> None:
        task = self.task
        if prediction.probabilities:
            self.probabilities[position] = [prediction.probabilities.get(name, np.nan)
                                            for name in task.label_names]
        if prediction.ok and prediction.label in task.label_names:
            self.codes[position] = task.label_names.index(prediction.label)
            conf = prediction.confidence
            self.confidence[position] = np.nan if conf is None else conf
            self.errors.pop(position, None)
        else:
            self.codes[position] = -1
            self.errors[position] = prediction.error or (
                f"answer is not one of the labels: {prediction.raw_text[:80]!r}")


ProgressCallback = Callable[[Progress], None]
BatchCallback = Callable[[np.ndarray, list[Prediction]], None]


def stamp_settings_for(backend: Backend, settings: StampSettings | None = None) -> StampSettings:
    """The user's stamp settings adjusted to what the engine reads: PNG bytes only for
    engines that take bytes; never larger than the engine can use."""
    settings = settings or StampSettings()
    max_size = settings.max_size
    if backend.max_stamp_size is not None:
        max_size = min(max_size or backend.max_stamp_size, backend.max_stamp_size)
    return dataclasses.replace(settings, max_size=max_size,
                               encode_png=backend.accepts == "png")


def _chunks(stamps: Iterator[Stamp], size: int) -> Iterator[list[Stamp]]:
    chunk: list[Stamp] = []
    for stamp in stamps:
        chunk.append(stamp)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def classify(source: StampSource, rows: Sequence[int], task: Task, backend: Backend, *,
             store: ResultStore | None = None, stamp_settings: StampSettings | None = None,
             progress: ProgressCallback | None = None, on_batch: BatchCallback | None = None,
             cancel: threading.Event | None = None) -> RunResult:
    """Classify catalog ``rows`` of ``source`` with ``backend`` for ``task``.

    Each answer goes to ``store`` before it is reported (to ``on_batch``, with the
    positions in ``rows`` it belongs to). Rows whose stored answer is good are not sent
    again; stored failures are retried. Setting ``cancel`` stops the run after the
    current engine batch; the result then has ``cancelled`` set. A row that fails does
    not stop the run; a ``BackendError`` (the engine cannot work at all) does, after
    everything answered so far is stored.
    """
    rows = np.asarray(rows, dtype=np.int64)
    result = RunResult.empty(task, rows)
    state = result.progress
    context = run_context(task, backend)
    settings = stamp_settings_for(backend, stamp_settings)
    batch_size = max(1, int(backend.batch_size))
    if store is not None:
        backend.attach_store(store)
    start = time.perf_counter()

    def report(positions: list[int], predictions: list[Prediction], origin: str) -> None:
        """``origin``: "store" (cached), "engine" (answered now) or "input" (no stamp)."""
        for position, prediction in zip(positions, predictions):
            result.record(position, prediction)
            state.failed += position in result.errors
            if origin == "engine":
                result.usage.add(prediction)
        state.done += len(positions)
        if origin == "store":
            state.cached += len(positions)
        elif origin == "engine":
            state.called += len(positions)
            result.usage.calls += 1
        state.elapsed = time.perf_counter() - start
        if on_batch is not None:
            on_batch(np.asarray(positions, dtype=np.int64), predictions)
        if progress is not None:
            progress(state)

    def cancelled() -> bool:
        return cancel is not None and cancel.is_set()

    def ask(batch: list[tuple[Stamp, str]]) -> None:
        """Send (stamp, store key) pairs to the engine; store, then report, the answers."""
        predictions = backend.predict([st for st, _ in batch], task)
        if len(predictions) != len(batch):
            raise RuntimeError(f"{type(backend).__name__}.predict returned "
                               f"{len(predictions)} predictions for {len(batch)} stamps")
        if store is not None:
            store.put_many([(key, p) for (_, key), p in zip(batch, predictions)], task,
                           backend)
        report([st.index for st, _ in batch], predictions, "engine")

    # Stamps are looked up a batch at a time while the stamp thread prepares the next;
    # rows the store cannot answer queue until they fill an engine batch.
    waiting: list[tuple[Stamp, str]] = []
    stamps = iter_stamps(source, rows, settings, look_ahead=batch_size)
    try:
        for chunk in _chunks(stamps, batch_size):
            if cancelled():
                break
            bad = [st for st in chunk if st.pixels is None]
            if bad:
                report([st.index for st in bad],
                       [Prediction.failed(st.error or "no stamp") for st in bad], "input")
            good = [(st, stamp_key(context, st.pixels)) for st in chunk
                    if st.pixels is not None]
            stored = store.get_many([key for _, key in good]) if store is not None else {}
            answered = {key: p for key, p in stored.items() if p.ok}  # failures: ask again
            hits = [(st, answered[key]) for st, key in good if key in answered]
            if hits:
                report([st.index for st, _ in hits], [p for _, p in hits], "store")
            waiting += [(st, key) for st, key in good if key not in answered]
            while len(waiting) >= batch_size and not cancelled():
                ask(waiting[:batch_size])
                waiting = waiting[batch_size:]
        while waiting and not cancelled():
            ask(waiting[:batch_size])
            waiting = waiting[batch_size:]
    finally:
        stamps.close()  # stops the stamp thread when the run ends early
    result.cancelled = cancelled() and state.done < state.total
    state.elapsed = time.perf_counter() - start
    return result
