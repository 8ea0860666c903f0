"""The column contract: what a classification adds to a catalog.

For a task with column prefix ``t``: ``t_label`` (text, ``unclassified`` where no
label), ``t_code`` (int, -1 = not classified), ``t_confidence`` (float, NaN when
unknown) and ``t_p_<label>`` (float per label, NaN when unknown).
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from .run import RunResult
from .tasks import Task, column_safe

UNCLASSIFIED = "unclassified"

__all__ = ["UNCLASSIFIED", "column_names", "empty_columns", "fill_columns",
           "label_categories", "probability_column", "provenance"]


def probability_column(task: Task, label: str) -> str:
    return f"{task.column_prefix}_p_{column_safe(label)}"


def column_names(task: Task) -> list[str]:
    prefix = task.column_prefix
    return ([f"{prefix}_label", f"{prefix}_code", f"{prefix}_confidence"]
            + [probability_column(task, name) for name in task.label_names])


def label_categories(task: Task) -> list[str]:
    """Every value the label column can take, in code order, then ``unclassified``."""
    return task.label_names + [UNCLASSIFIED]


def empty_columns(task: Task, n_rows: int) -> dict[str, np.ndarray]:
    """Columns for ``n_rows`` catalog rows with nothing classified."""
    prefix = task.column_prefix
    width = max(len(name) for name in label_categories(task))
    columns = {
        f"{prefix}_label": np.full(n_rows, UNCLASSIFIED, dtype=f"<U{width}"),
        f"{prefix}_code": np.full(n_rows, -1, dtype=np.int16),
        f"{prefix}_confidence": np.full(n_rows, np.nan, dtype=np.float32),
    }
    for name in task.label_names:
        columns[probability_column(task, name)] = np.full(n_rows, np.nan, dtype=np.float32)
    return columns


def fill_columns(columns: dict[str, np.ndarray], result: RunResult,
                 positions: np.ndarray | None = None) -> None:
    """Write ``result`` (all of it, or only ``positions`` in it) into ``columns`` at
    the catalog rows it covers; rows outside it keep their values."""
    task = result.task
    prefix = task.column_prefix
    if positions is None:
        positions = np.arange(len(result.rows))
    rows = result.rows[positions]
    codes = result.codes[positions]
    columns[f"{prefix}_code"][rows] = codes
    columns[f"{prefix}_label"][rows] = np.array(label_categories(task))[codes]
    columns[f"{prefix}_confidence"][rows] = result.confidence[positions]
    for i, name in enumerate(task.label_names):
        columns[probability_column(task, name)][rows] = result.probabilities[positions, i]


def provenance(task, backend, store, result) -> dict:
    """What produced the columns; never a secret."""
    return {"task": task.slug, "prompt": task.render_prompt(), "labels": task.label_names,
            "backend": backend.name, "model": backend.model,
            "settings": {k: str(v) for k, v in backend.settings().items()},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "store": str(store.path), "rows_classified": int((result.codes >= 0).sum()),
            "rows_failed": len(result.errors), "complete": not result.cancelled}
