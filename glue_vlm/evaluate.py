"""Compare predicted labels with the truth: accuracy, per-class precision / recall / F1,
the confusion matrix and, given confidences, the expected calibration error.

Rows the model did not classify (None, "", NaN, masked, ``"unclassified"``, code -1) are
kept, not dropped: they are counted as wrong in the accuracy and in every class's
recall, and get their own last column in the confusion matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["Evaluation", "evaluate", "plot_confusion", "UNCLASSIFIED", "ECE_BINS"]

#: name of the confusion matrix's extra column, and the value a label column holds for
#: a row that was not classified
UNCLASSIFIED = "unclassified"
ECE_BINS = 10


@dataclass
class Evaluation:
    """Scores of one set of predictions against the truth.

    ``confusion`` has one row per true label and one column per predicted label, both
    in ``labels`` order, plus a last column counting rows left unclassified.
    Precision of a label that was never predicted, and recall of a label absent from
    the truth, are 0.0. ``ece`` is None when no confidences were given;
    ``n_confidence`` is the number of classified rows with a confidence it was
    computed from.
    """

    labels: list[str]
    n: int
    n_unclassified: int
    accuracy: float
    confusion: np.ndarray
    precision: dict[str, float]
    recall: dict[str, float]
    f1: dict[str, float]
    support: dict[str, int]
    ece: float | None = None
    n_confidence: int = 0

    @property
    def confusion_columns(self) -> list[str]:
        """Column headers of ``confusion``."""
        return [*self.labels, UNCLASSIFIED]

    def macro(self, metric: str) -> float:
        """Unweighted mean of ``precision``, ``recall`` or ``f1`` over the labels."""
        values = getattr(self, metric)
        return float(np.mean([values[lab] for lab in self.labels]))

    def format(self) -> str:
        """A plain-text report: accuracy, a per-label table, the confusion matrix, ECE."""
        lines = [f"{self.n} rows, {self.n_unclassified} unclassified "
                 "(counted as wrong)",
                 f"accuracy  {self.accuracy:.3f}", ""]
        width = max(len("macro avg"), *(len(lab) for lab in self.labels))
        lines.append(f"{'label':<{width}}  precision  recall     f1  support")
        for lab in self.labels:
            lines.append(f"{lab:<{width}}  {self.precision[lab]:9.3f}  "
                         f"{self.recall[lab]:6.3f}  {self.f1[lab]:5.3f}  "
                         f"{self.support[lab]:7d}")
        lines.append(f"{'macro avg':<{width}}  {self.macro('precision'):9.3f}  "
                     f"{self.macro('recall'):6.3f}  {self.macro('f1'):5.3f}  "
                     f"{self.n:7d}")
        lines += ["", "confusion matrix (rows: true, columns: predicted)"]
        columns = self.confusion_columns
        cells = [max(len(name), *(len(str(v)) for v in self.confusion[:, j]))
                 for j, name in enumerate(columns)]
        lines.append(" " * width + "".join(f"  {c:>{w}}" for c, w in zip(columns, cells)))
        for lab, row in zip(self.labels, self.confusion):
            lines.append(f"{lab:<{width}}"
                         + "".join(f"  {int(v):>{w}d}" for v, w in zip(row, cells)))
        lines.append("")
        if self.ece is None:
            lines.append("ECE: no confidences given")
        else:
            lines.append(f"ECE ({ECE_BINS} equal-width bins): {self.ece:.3f} over "
                         f"{self.n_confidence} classified rows with a confidence")
        return "\n".join(lines)


def evaluate(truth: Sequence, predicted: Sequence, labels: Sequence[str] | None = None,
             confidence: Sequence[float] | None = None) -> Evaluation:
    """Score ``predicted`` against ``truth`` (same length, one entry per row).

    Entries are label names, or integer codes that index ``labels``. A prediction that
    is None, empty, NaN, masked, ``"unclassified"`` or a negative code means the row
    was not classified: it counts as wrong (accuracy = correct rows / all rows).
    ``labels`` fixes the label order; by default it is every label seen in either
    sequence, sorted (integer codes need ``labels``). ``confidence`` (the probability
    the model gave its predicted label; NaN or None when unknown) adds the expected
    calibration error over the classified rows that have one: rows fall in bin
    ``floor(10 * p)`` (p = 1 in the last), and ECE = sum over bins of
    (rows in bin / rows) * |accuracy in bin - mean confidence in bin|.
    """
    truth_values, predicted_values = _values(truth), _values(predicted)
    if len(truth_values) != len(predicted_values):
        raise ValueError(f"truth has {len(truth_values)} rows but the predictions have "
                         f"{len(predicted_values)}")
    if not truth_values:
        raise ValueError("nothing to evaluate: no rows")
    labels = _label_order(labels, truth_values, predicted_values)
    true_codes = np.array([_code(v, labels, "truth", i, allow_missing=False)
                           for i, v in enumerate(truth_values)], dtype=int)
    pred_codes = np.array([_code(v, labels, "prediction", i, allow_missing=True)
                           for i, v in enumerate(predicted_values)], dtype=int)

    k = len(labels)
    confusion = np.zeros((k, k + 1), dtype=int)
    # unclassified rows (code -1) go in the last column
    np.add.at(confusion, (true_codes, np.where(pred_codes < 0, k, pred_codes)), 1)
    n = len(true_codes)
    correct = int(np.trace(confusion[:, :k]))
    precision, recall, f1, support = {}, {}, {}, {}
    for i, lab in enumerate(labels):
        hit = confusion[i, i]
        predicted_as = confusion[:, i].sum()
        support[lab] = int(confusion[i].sum())
        precision[lab] = float(hit / predicted_as) if predicted_as else 0.0
        recall[lab] = float(hit / support[lab]) if support[lab] else 0.0
        p, r = precision[lab], recall[lab]
        f1[lab] = 2 * p * r / (p + r) if p + r else 0.0

    ece, n_confidence = None, 0
    if confidence is not None:
        ece, n_confidence = _calibration(confidence, true_codes, pred_codes)
    return Evaluation(labels=labels, n=n, n_unclassified=int((pred_codes < 0).sum()),
                      accuracy=correct / n, confusion=confusion,
                      precision=precision, recall=recall, f1=f1, support=support,
                      ece=ece, n_confidence=n_confidence)


# -- inputs ---------------------------------------------------------------------------------
def _values(column) -> list:
    """Plain Python values of a sequence / numpy / astropy column; masked -> None."""
    if isinstance(column, (str, bytes)):
        raise TypeError("expected a sequence of labels, got a single string")
    mask = np.ma.getmaskarray(column) if np.ma.isMaskedArray(column) else None
    values = list(np.ma.getdata(column)) if mask is not None else list(column)
    if mask is not None:
        values = [None if m else v for v, m in zip(values, mask)]
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() in ("", UNCLASSIFIED)
    return isinstance(value, Real) and not isinstance(value, Integral) and math.isnan(value)


def _as_code(value) -> int | None:
    """An integer code from an int or an integral float (FITS columns), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real) and float(value).is_integer():
        return int(value)
    return None


def _label_order(labels, truth: list, predicted: list) -> list[str]:
    if labels is not None:
        labels = [str(lab) for lab in labels]
        if len(set(labels)) != len(labels) or not labels:
            raise ValueError(f"labels must be distinct and not empty, got {labels}")
        if UNCLASSIFIED in labels:
            raise ValueError(f"{UNCLASSIFIED!r} marks rows without a prediction and "
                             "cannot be a label")
        return labels
    seen = set()
    for value in truth + predicted:
        if _is_missing(value):
            continue
        if not isinstance(value, str):
            raise ValueError("integer class codes need the list of labels they index: "
                             "pass labels=[...]")
        seen.add(value.strip())
    if not seen:
        raise ValueError("no labels to evaluate: the truth is empty")
    return sorted(seen)


def _code(value, labels: list[str], what: str, row: int, allow_missing: bool) -> int:
    """Position of ``value`` in ``labels``; -1 for an unclassified prediction."""
    if _is_missing(value):
        if allow_missing:
            return -1
        raise ValueError(f"truth row {row} has no label: drop unlabelled rows first")
    if isinstance(value, str):
        name = value.strip()
        if name in labels:
            return labels.index(name)
        raise ValueError(f"{what} row {row} is {name!r}, which is not one of the labels "
                         f"{', '.join(labels)}")
    code = _as_code(value)
    if code is None:
        raise ValueError(f"{what} row {row} is {value!r}: expected a label name or an "
                         "integer code")
    if code < 0 and allow_missing:
        return -1
    if not 0 <= code < len(labels):
        raise ValueError(f"{what} row {row} has code {code}, outside 0..{len(labels) - 1} "
                         f"for labels {', '.join(labels)}")
    return code


def _calibration(confidence, true_codes: np.ndarray,
                 pred_codes: np.ndarray) -> tuple[float | None, int]:
    values = _values(confidence)
    if len(values) != len(true_codes):
        raise ValueError(f"confidence has {len(values)} rows but the predictions have "
                         f"{len(true_codes)}")
    conf = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    known = ~np.isnan(conf)
    if np.any((conf[known] < 0) | (conf[known] > 1)):
        raise ValueError("confidences must lie between 0 and 1")
    use = known & (pred_codes >= 0)
    if not use.any():
        return None, 0
    conf, hit = conf[use], (pred_codes[use] == true_codes[use])
    bins = np.minimum(np.floor(conf * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        members = bins == b
        if members.any():
            ece += members.mean() * abs(hit[members].mean() - conf[members].mean())
    return float(ece), int(use.sum())


# -- plot -----------------------------------------------------------------------------------
def plot_confusion(evaluation: Evaluation, path: str | Path, title: str | None = None) -> None:
    """Write the confusion matrix as a PNG: counts in the cells, colour = share of the
    true row. The unclassified column is drawn only when some rows are unclassified."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = evaluation.confusion_columns
    counts = evaluation.confusion
    if evaluation.n_unclassified == 0:
        columns, counts = columns[:-1], counts[:, :-1]
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)

    fig = Figure(figsize=(2.5 + 0.9 * len(columns), 2.0 + 0.7 * len(evaluation.labels)),
                 dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(evaluation.labels)), evaluation.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {evaluation.accuracy:.3f} (n = {evaluation.n})")
    fig.colorbar(image, ax=ax, label="fraction of true row")
    fig.savefig(path, format="png")
