"""Write classification results into a glue ``Data`` as components (main thread only).

The columns follow the contract of :mod:`glue_vlm.columns`. Glue has a few traps here
(see DESIGN.md): a categorical column cannot be updated with ``update_components``, so
it is replaced with ``add_component(new, same_cid)``; a label added twice makes two
columns, so existing ComponentIDs are always reused; subsets cache their masks, so the
caches are cleared and one ``NumericalDataChangedMessage`` tells viewers to redraw.
"""

from __future__ import annotations

import threading

import numpy as np

from ..columns import (UNCLASSIFIED, column_names, empty_columns, fill_columns,
                       label_categories, provenance)
from ..run import RunResult
from ..tasks import Task

__all__ = ["write_result", "write_run", "reached_positions", "read_columns", "write_review", "review_column",
           "record_provenance", "provenance_of", "class_counts", "component_id",
           "UNREVIEWED", "META_KEY"]

#: ``data.meta`` key holding {task slug: provenance}
META_KEY = "glue_vlm"
#: value of the review column for rows nobody has looked at
UNREVIEWED = "unreviewed"


def _require_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("glue columns can only be written from the main thread: "
                           "send results to it (a Qt signal) and write them there")


def component_id(data, label: str):
    """The ComponentID of ``data``'s own (non-coordinate) column ``label``, or None."""
    for cid in data.main_components:
        if cid.label == label:
            return cid
    return None


def read_columns(data, task: Task) -> dict[str, np.ndarray] | None:
    """The task's columns as they are in ``data`` (copies), or None when they are
    missing or were written for other labels (the caller then starts afresh)."""
    names = column_names(task)
    cids = [component_id(data, name) for name in names]
    if any(cid is None for cid in cids):
        return None
    label = data.get_component(cids[0])
    if not getattr(label, "categorical", False) or \
            [str(c) for c in label.categories] != label_categories(task):
        return None
    template = empty_columns(task, 0)
    columns = {names[0]: np.asarray(label.labels).astype(template[names[0]].dtype)}
    for name, cid in zip(names[1:], cids[1:]):
        columns[name] = np.array(data[cid], dtype=template[name].dtype)
    return columns


def write_result(data, result: RunResult, positions: np.ndarray | None = None) -> dict:
    """Write ``result`` (all of it, or only ``positions`` in it) into ``data`` and
    return {column name: ComponentID}.

    The first write creates every column, with ``unclassified``/-1/NaN on the rows the
    result does not cover; later writes update the same components in place, keeping
    other rows' values. Columns written earlier for a task with the same name but other
    labels are reset (and probability columns of labels no longer in the task are
    removed)."""
    _require_main_thread()
    task = result.task
    if data.ndim != 1:
        raise ValueError(f"{data.label!r} is not a table: it has shape {data.shape}")
    n_rows = data.shape[0]
    if len(result.rows) and int(result.rows.max()) >= n_rows:
        raise ValueError(f"result covers row {int(result.rows.max())} but {data.label} "
                         f"has {n_rows} rows")
    columns = read_columns(data, task)
    if columns is None:
        _remove_stale_columns(data, task)
        columns = empty_columns(task, n_rows)
    fill_columns(columns, result, positions)
    return _store_columns(data, columns, label_categories(task))


def write_run(data, result: RunResult, backend, store, stopped_by: str | None = None) -> dict:
    """Write a finished (or cancelled, or stopped) run: the rows it reached (answered or
    failed; rows it never got to keep their values), then its provenance in
    ``data.meta``. ``stopped_by`` is the reason a run ended early with an error. A run
    that reached no row writes nothing."""
    positions = reached_positions(result)
    if positions.size == 0:
        return {}
    cids = write_result(data, result, positions)
    record = provenance(result.task, backend, store, result)
    if stopped_by:
        record.update(complete=False, stopped_by=stopped_by)
    record_provenance(data, result.task, record)
    return cids


def reached_positions(result: RunResult) -> np.ndarray:
    """Positions in ``result`` that got an answer or a failure (not those a cancelled
    or stopped run never reached)."""
    reached = result.codes >= 0
    reached[list(result.errors)] = True
    return np.flatnonzero(reached)


def _remove_stale_columns(data, task: Task) -> None:
    prefix = f"{task.column_prefix}_p_"
    keep = set(column_names(task))
    for cid in list(data.main_components):
        if cid.label.startswith(prefix) and cid.label not in keep:
            data.remove_component(cid)


def _store_columns(data, columns: dict[str, np.ndarray], categories: list[str]) -> dict:
    """Put ``columns`` into ``data``: replace existing components (same ids), add the
    missing ones, then one change message and fresh subset masks."""
    from glue.core.component import CategoricalComponent, Component

    cids, changed = {}, []
    for name, values in columns.items():
        if values.dtype.kind == "U":
            component = CategoricalComponent(values, categories=categories)
        else:
            component = Component(values)
        cid = component_id(data, name)
        if cid is None:
            cids[name] = data.add_component(component, name)
        else:
            cids[name] = data.add_component(component, cid)
            changed.append(cid)
    if changed:
        _announce_change(data, changed)
    return cids


def _announce_change(data, cids) -> None:
    from glue.core.decorators import clear_cache
    from glue.core.message import NumericalDataChangedMessage

    for subset in data.subsets:
        clear_cache(subset.subset_state.to_mask)
    if data.hub is not None:
        data.hub.broadcast(NumericalDataChangedMessage(data, components_changed=list(cids)))


# -- review ------------------------------------------------------------------------------
def review_column(task: Task) -> str:
    return f"{task.column_prefix}_human"


def write_review(data, task: Task, rows, label: str):
    """Set the hand-given class of catalog ``rows`` to ``label`` (or ``unreviewed``) in
    the separate ``<t>_human`` column; the model's columns are never touched."""
    _require_main_thread()
    categories = task.label_names + [UNREVIEWED]
    if label not in categories:
        raise ValueError(f"{label!r} is not a label of task {task.slug!r}: use one of "
                         f"{', '.join(categories)}")
    name = review_column(task)
    width = max(len(c) for c in categories)
    cid = component_id(data, name)
    values = np.full(data.shape[0], UNREVIEWED, dtype=f"<U{width}")
    if cid is not None:
        old = data.get_component(cid)
        known = np.isin(old.labels.astype(str), categories)
        values[known] = old.labels.astype(str)[known]
    values[np.asarray(rows, dtype=np.int64)] = label
    return _store_columns(data, {name: values}, categories)[name]


# -- provenance and summaries ----------------------------------------------------------
def record_provenance(data, task: Task, provenance: dict) -> None:
    """Keep what produced the task's columns in ``data.meta`` (saved with sessions).
    ``provenance`` must hold no secret (``glue_vlm.columns.provenance`` never does)."""
    entries = dict(data.meta.get(META_KEY) or {})
    entries[task.slug] = provenance
    data.meta[META_KEY] = entries


def provenance_of(data, task: Task) -> dict | None:
    return (data.meta.get(META_KEY) or {}).get(task.slug)


def class_counts(data, task: Task) -> dict[str, int]:
    """Rows per label, plus ``unclassified``, from the task's code column."""
    cid = component_id(data, f"{task.column_prefix}_code")
    names = label_categories(task)
    if cid is None:
        return {name: 0 for name in names[:-1]} | {UNCLASSIFIED: int(data.shape[0])}
    codes = np.asarray(data[cid]).astype(np.int64)
    codes = np.where((codes >= 0) & (codes < len(task.labels)), codes, len(task.labels))
    counts = np.bincount(codes, minlength=len(names))
    return dict(zip(names, counts.tolist()))
