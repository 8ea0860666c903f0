"""Classify a glue catalog without the panel: for Glue's IPython terminal and scripts.

>>> from glue_vlm.glue.scripting import classify_data, image_source
>>> source = image_source(catalog, image, size=64)          # linked in glue
>>> classify_data(catalog, source, "galaxy-morphology", "local", rows=subset)

Blocking, on the main thread; the columns and the provenance are written once the run
ends (also when it was cancelled). Answers reach the result store as they come, so an
interrupted call run again repeats no engine call.
"""

from __future__ import annotations

import threading

from ..backends.base import Backend, create_backend
from ..run import ProgressCallback, RunResult, classify
from ..stamps import StampSettings, StampSource
from ..store import ResultStore
from ..tasks import Task, get_task
from .columns import write_run
from .sources import GlueInputError, cube_source, image_source, path_source, rows_of

__all__ = ["classify_data", "image_source", "cube_source", "path_source"]


def classify_data(data, source: StampSource, task: Task | str, backend: Backend | str, *,
                  rows=None, store: ResultStore | str | None = None,
                  stamp_settings: StampSettings | None = None,
                  progress: ProgressCallback | None = None,
                  cancel: threading.Event | None = None) -> RunResult:
    """Classify ``rows`` of the catalog ``data`` and write the task's columns into it.

    ``source``: stamps aligned with the catalog's rows (see :func:`image_source`,
    :func:`cube_source`, :func:`path_source`). ``task``: a Task, a preset name or a
    ``.toml`` path. ``backend``: an engine, or a name such as ``"local"`` (built with
    its defaults). ``rows``: None (all), a subset or subset group, a boolean mask or
    row numbers. ``store``: a ResultStore, a path, or None for the default store file.
    Returns the run's result; the catalog then has ``<t>_label``, ``<t>_code``,
    ``<t>_confidence`` and ``<t>_p_<label>`` columns and ``meta["glue_vlm"]``.
    """
    task = get_task(task) if isinstance(task, str) else task
    index = rows_of(data, rows)
    if getattr(source, "n_rows", data.shape[0]) != data.shape[0]:
        raise GlueInputError(f"the stamp source has {source.n_rows} rows but "
                             f"{data.label!r} has {data.shape[0]}: they must be row-aligned")
    own_store = not isinstance(store, ResultStore)
    results = ResultStore(store) if own_store else store
    own_engine = isinstance(backend, str)
    engine = create_backend(backend) if own_engine else backend
    try:
        result = classify(source, index, task, engine, store=results,
                          stamp_settings=stamp_settings, progress=progress, cancel=cancel)
        write_run(data, result, engine, results)
    finally:
        if own_engine:
            engine.close()
        if own_store:
            results.close()
    return result
