"""Rerun the study this tool grows from (Tanoglidis & Jain 2024, arXiv:2406.17057) and
set its published numbers beside this tool's.

The study classified the first 500 images of two labelled sets, one at a time, with a
published prompt, and read the model's free text. ``reproduce`` takes the same images in
the same order and runs them through the normal engine (:func:`glue_vlm.run.classify`,
the result store) in two modes:

``paper``
    The published prompt (presets ``paper-lsbg`` / ``paper-morphology``, verbatim from the
    authors' notebook ``Zero_shot_LLaVa.ipynb``, github.com/dtanoglidis/zero-shot-astro),
    free text read by :func:`glue_vlm.parsing.parse_answer`. The local engine generates
    (``mode="generate"``, up to 200 new tokens as in the study); an OpenAI-compatible
    engine is asked for free text, with no schema. What still differs from the study:
    the model's own chat template instead of the LLaVA-1.5 ``USER: <image>\\n...
    ASSISTANT:`` wrapper, our parser instead of a second GPT-4o call that turned the text
    into a number, and no 4-bit quantisation unless ``quantization="4bit"`` is given.
``improved``
    This tool's prompts (``lsbg-vs-artifact`` / ``galaxy-morphology``) with the answer
    held to the labels: option scoring in one forward pass locally, a JSON schema with
    logprobs over HTTP. Confidences come from token probabilities.

Data: exactly what the notebook loaded (see :data:`LSBG_LAYOUT`, :data:`MORPHOLOGY_LAYOUT`).

- ``lsbg``: the arrays of github.com/dtanoglidis/UPenn_DS_Hangout (DeepShadows cutouts,
  DES DR1 colour JPEGs from the Legacy Survey viewer resized to 64 x 64):
  ``X_data_1.npy`` ... ``X_data_5.npy``, N x 64 x 64 x 3, concatenated in that order, and
  ``y_labels.npy``, 5,000 float labels (1 = LSBG, 0 = artifact). The study took the first
  500 (264 LSBG, 236 artifact). The cutouts' dtype is recorded nowhere we could read
  (the files are too large to be indexed); the notebook wrote each with
  ``matplotlib.pyplot.imsave``, which takes uint8 or floats in 0..1. So uint8 is used as
  is, floats in 0..1 become ``uint8(x * 255)`` as imsave makes them, and numbers above
  1 (the 0-255 JPEG values DeepShadows' ``File_Creation.ipynb`` stored as floats) are
  rounded.
- ``morphology``: GalaxyMNIST's canonical training split, ``train_dataset.hdf5``
  (github.com/mwalmsley/galaxy_mnist; HDF5 datasets ``images``: uint8 N x 64 x 64 x 3 and
  ``labels``: 0 smooth_round, 1 smooth_cigar, 2 edge_on_disk, 3 unbarred_spiral). The
  notebook loaded it through ``GalaxyMNIST(train=True)``, which reads that file in file
  order; the study took the first 500 (140 / 119 / 100 / 141).
"""

from __future__ import annotations

import gzip
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backends.base import Backend, BackendError, create_backend
from .evaluate import Evaluation, evaluate, plot_confusion
from .run import RunResult, classify
from .stamps import CubeSource
from .store import ResultStore
from .tasks import PRESETS, Task

__all__ = ["MODES", "STUDIES", "ReproduceError", "Reproduction", "Study", "StudyImages",
           "format_report", "load_images", "reproduce"]

MODES = ("paper", "improved")
#: the study's answer length for LLaVA-NeXT (``max_new_tokens=200``)
PAPER_MAX_NEW_TOKENS = 200
STUDY_N = 500

LSBG_LAYOUT = ("a folder holding X_data_1.npy ... X_data_5.npy and y_labels.npy (git clone "
               "https://github.com/dtanoglidis/UPenn_DS_Hangout)")
MORPHOLOGY_LAYOUT = ("GalaxyMNIST's train_dataset.hdf5 (or .hdf5.gz), or a folder holding it "
                     "directly, in raw/ or in GalaxyMNIST/raw/ (https://github.com/mwalmsley/"
                     "galaxy_mnist downloads it there)")
GALAXY_MNIST_NAMES = ("train_dataset.hdf5", "raw/train_dataset.hdf5",
                      "GalaxyMNIST/raw/train_dataset.hdf5")


class ReproduceError(ValueError):
    """The data or the request cannot be used; the message says what to change."""


# -- what the study published --------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """One published result. ``confusion``: rows true, columns predicted, both in the
    task's label order (None where the study gave only an accuracy)."""

    source: str
    accuracy: str
    n: int | None = STUDY_N
    confusion: tuple[tuple[int, ...], ...] | None = None

    def evaluation(self, labels: Sequence[str]) -> Evaluation | None:
        if self.confusion is None:
            return None
        truth, predicted = [], []
        for true, row in zip(labels, self.confusion):
            for guess, count in zip(labels, row):
                truth += [true] * count
                predicted += [guess] * count
        return evaluate(truth, predicted, labels=list(labels))


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    paper_task: str
    improved_task: str
    layout: str
    #: label counts of the study's 500 images, in label order
    counts: tuple[int, ...]
    published: tuple[Published, ...]

    @property
    def labels(self) -> list[str]:
        return PRESETS[self.paper_task].label_names

    def task(self, mode: str) -> Task:
        return PRESETS[self.paper_task if mode == "paper" else self.improved_task]


STUDIES = {
    "lsbg": Study(
        name="lsbg", title="LSBG vs artifact (DES, DeepShadows set)",
        paper_task="paper-lsbg", improved_task="lsbg-vs-artifact", layout=LSBG_LAYOUT,
        counts=(236, 264),
        published=(
            # paper.md: true LSBG 149 LSBG / 115 artifact, true artifact 98 / 138
            Published("study: LLaVA-NeXT", "0.574", confusion=((138, 98), (115, 149))),
            Published("study: GPT-4o", "~0.83"),
            Published("supervised CNN (DeepShadows)", "0.92", n=None),
        )),
    "morphology": Study(
        name="morphology", title="Galaxy morphology (GalaxyMNIST, 4 classes)",
        paper_task="paper-morphology", improved_task="galaxy-morphology",
        layout=MORPHOLOGY_LAYOUT, counts=(140, 119, 100, 141),
        published=(
            Published("study: LLaVA-NeXT", "0.470", confusion=(
                (136, 2, 0, 2), (17, 57, 5, 40), (10, 31, 7, 52), (104, 2, 0, 35))),
            Published("study: GPT-4o", ">0.8"),
            Published("zero-shot CLIP (CLIP-GMC)", "0.687", n=None),
            Published("supervised CNNs", "0.90-0.93", n=None),
        )),
}


# -- the study's images --------------------------------------------------------------------
@dataclass
class StudyImages:
    """The first ``n`` images in the study's order: display-ready uint8 pixels
    (n x H x W x 3) and the true label names."""

    pixels: np.ndarray
    truth: list[str]
    origin: str


def load_images(study: str | Study, data: str | Path, n: int = STUDY_N) -> StudyImages:
    """The study's first ``n`` images and labels from the files the user downloaded."""
    study = _study(study)
    if int(n) < 1:
        raise ReproduceError(f"--n must be at least 1, got {n}")
    loader = _load_lsbg if study.name == "lsbg" else _load_galaxy_mnist
    pixels, codes, origin = loader(Path(data).expanduser(), int(n))
    labels = study.labels
    bad = (codes < 0) | (codes >= len(labels)) | (codes != np.round(codes))
    if bad.any():
        raise ReproduceError(f"label {codes[bad][0]!r} in {origin} is not a class code "
                             f"0..{len(labels) - 1} ({', '.join(labels)})")
    truth = [labels[int(c)] for c in codes]
    return StudyImages(pixels=pixels, truth=truth, origin=origin)


def _study(study: str | Study) -> Study:
    if isinstance(study, Study):
        return study
    if study not in STUDIES:
        raise ReproduceError(f"unknown study {study!r}: use one of {', '.join(STUDIES)}")
    return STUDIES[study]


def _load_lsbg(path: Path, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    folder = path.parent if path.is_file() and (
        path.name == "y_labels.npy" or re.fullmatch(r"X_data_\d+\.npy", path.name)) else path
    if not folder.is_dir():
        what = "no such folder" if not folder.exists() else "not a folder"
        raise ReproduceError(f"{what}: {folder}; lsbg --data is {LSBG_LAYOUT}")
    parts = []
    while (folder / f"X_data_{len(parts) + 1}.npy").is_file():
        parts.append(folder / f"X_data_{len(parts) + 1}.npy")
    missing = [name for name, found in (("X_data_1.npy", parts),
                                        ("y_labels.npy", (folder / "y_labels.npy").is_file()))
               if not found]
    if missing:
        raise ReproduceError(f"{folder} has no {' or '.join(missing)}; lsbg --data is "
                             f"{LSBG_LAYOUT}")
    labels = _read_npy(folder / "y_labels.npy")
    if labels.ndim != 1 or labels.dtype.kind not in "biuf":
        raise ReproduceError(f"{folder / 'y_labels.npy'} holds {labels.dtype} of shape "
                             f"{labels.shape}; expected one 0/1 label per image")
    chunks, shape, total = [], None, 0
    for part in parts:
        cube = _read_npy(part)
        if cube.ndim != 4 or cube.shape[-1] != 3:
            raise ReproduceError(f"{part} holds an array of shape {cube.shape}; expected "
                                 "N x H x W x 3 colour cutouts")
        if shape is not None and cube.shape[1:] != shape:
            raise ReproduceError(f"{part} holds {cube.shape[1:]} cutouts but "
                                 f"{parts[0].name} holds {shape}")
        shape = cube.shape[1:]
        total += len(cube)
        if sum(len(c) for c in chunks) < n:
            chunks.append(cube[:n - sum(len(c) for c in chunks)])
    have = min(total, len(labels))
    if have < n:
        raise ReproduceError(f"{folder} has {total} cutouts and {len(labels)} labels; "
                             f"--n {n} needs {n} of each")
    pixels = np.concatenate([_display_pixels(c, folder) for c in chunks])
    return pixels, np.asarray(labels[:n], dtype=float), f"{folder}/X_data_*.npy"


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ReproduceError(f"cannot read {path} as a numpy .npy file: {exc}") from None


def _display_pixels(values: np.ndarray, origin) -> np.ndarray:
    """uint8 colour pixels as ``plt.imsave`` would have written them (see the module
    docstring)."""
    if values.dtype == np.uint8:
        return np.ascontiguousarray(values)
    if values.dtype.kind not in "biuf":
        raise ReproduceError(f"the cutouts in {origin} are {values.dtype}, not numbers")
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ReproduceError(f"the cutouts in {origin} have NaN or infinite pixels")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise ReproduceError(f"the cutouts in {origin} span {low:g}..{high:g}; expected "
                             "colour values in 0..255 or 0..1")
    if high <= 1.0:
        return (values * 255).astype(np.uint8)
    return np.rint(values).astype(np.uint8)


def _galaxy_mnist_file(path: Path) -> Path:
    if path.is_dir():
        for name in GALAXY_MNIST_NAMES:
            for candidate in (path / name, path / (name + ".gz")):
                if candidate.is_file():
                    return candidate
        raise ReproduceError(f"no train_dataset.hdf5 in {path}; morphology --data is "
                             f"{MORPHOLOGY_LAYOUT}")
    if not path.is_file():
        raise ReproduceError(f"no such file: {path}; morphology --data is "
                             f"{MORPHOLOGY_LAYOUT}")
    if path.name.startswith("test_"):
        raise ReproduceError(f"{path.name} is GalaxyMNIST's test split; the study used the "
                             "first 500 images of the training split, train_dataset.hdf5")
    return path


def _load_galaxy_mnist(path: Path, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    import h5py

    path = _galaxy_mnist_file(path)
    source = path
    if path.suffix == ".gz":
        try:
            source = io.BytesIO(gzip.decompress(path.read_bytes()))
        except (OSError, EOFError) as exc:
            raise ReproduceError(f"cannot decompress {path}: {exc}") from None
    try:
        with h5py.File(source, "r") as hdf:
            missing = [key for key in ("images", "labels") if key not in hdf]
            if missing:
                raise ReproduceError(f"{path} has no {' or '.join(repr(k) for k in missing)} "
                                     f"dataset (it has: {', '.join(hdf) or 'nothing'}); "
                                     f"expected {MORPHOLOGY_LAYOUT}")
            images, labels = hdf["images"], hdf["labels"]
            if images.ndim != 4 or images.shape[-1] != 3 or labels.ndim != 1:
                raise ReproduceError(f"{path}: 'images' is {images.shape} and 'labels' "
                                     f"{labels.shape}; expected N x H x W x 3 and N")
            if min(len(images), len(labels)) < n:
                raise ReproduceError(f"{path} has {len(images)} images and {len(labels)} "
                                     f"labels; --n {n} needs {n} of each")
            pixels, codes = images[:n], labels[:n]
    except OSError as exc:
        raise ReproduceError(f"cannot read {path} as HDF5: {exc}") from None
    return _display_pixels(pixels, path), np.asarray(codes, dtype=float), str(path)


def count_check(study: str | Study, truth: Sequence[str]) -> str | None:
    """A warning when the study's full 500 were asked for but their labels are not the
    study's mix (a different file or order); None when they match or n != 500."""
    study = _study(study)
    if len(truth) != STUDY_N:
        return None
    counts = tuple(list(truth).count(label) for label in study.labels)
    if counts == study.counts:
        return None

    def mix(numbers):
        return ", ".join(f"{lab} {k}" for lab, k in zip(study.labels, numbers))

    return (f"warning: these 500 images are {mix(counts)}; the study's were "
            f"{mix(study.counts)}: the files or their order differ from the study's")


# -- running -------------------------------------------------------------------------------
@dataclass
class ModeRun:
    mode: str
    task: Task
    engine: str
    result: RunResult
    evaluation: Evaluation
    plot: Path


@dataclass
class Reproduction:
    study: Study
    images: StudyImages
    runs: list[ModeRun] = field(default_factory=list)
    out: Path | None = None
    notes: list[str] = field(default_factory=list)


def engine_for(mode: str, backend: str, options: dict | None = None,
               max_new_tokens: int = PAPER_MAX_NEW_TOKENS) -> Backend:
    """The engine for one mode: ``local`` generates free text (paper) or scores options
    (improved); ``openai`` answers in free text (paper) or settles on a constrained
    format (improved); any other engine gets ``options`` unchanged."""
    options = {k: v for k, v in (options or {}).items() if v is not None and k != "mode"}
    if backend == "local":
        options["mode"] = "generate" if mode == "paper" else "score"
        if mode == "paper":
            options["max_new_tokens"] = int(max_new_tokens)
    elif backend == "openai" and mode == "paper":
        return free_text_openai(**options)
    return create_backend(backend, **options)


def free_text_openai(**options) -> Backend:
    """An OpenAI-compatible engine that asks for free text and parses it, as the study
    did, instead of probing for a schema; its store key says so."""
    from .backends.openai import OpenAIBackend

    class FreeTextOpenAI(OpenAIBackend):
        def settings(self) -> dict:
            return {**super().settings(), "answer": "free text"}

    try:
        engine = FreeTextOpenAI(**options)
    except TypeError as exc:
        raise BackendError(f"backend 'openai' does not take these options: {exc}") from None
    engine.mode = "parse"  # the probe's outcome, fixed in advance
    engine.gives_probabilities = False
    return engine


def reproduce(study: str | Study, data: str | Path, *, backend: str = "openai",
              options: dict | None = None, modes: Sequence[str] = MODES, n: int = STUDY_N,
              out: str | Path | None = None, store: str | Path | None = None,
              max_cost: float | None = None,
              max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
              progress: Callable[[], Callable] | None = None, log=None) -> Reproduction:
    """Run the study's first ``n`` images in ``modes`` with ``backend`` (and its
    ``options``), through the result store at ``store`` (default: the user's).

    ``progress``: makes one progress bar per mode, called as ``bar(progress)`` and at the
    end ``bar(progress, final=True)``. Status lines go to ``log`` (default stderr).
    Confusion matrices (PNG) and a per-image predictions table go to ``out`` (default
    ``reproduce-<study>``)."""
    log = log or sys.stderr
    study = _study(study)
    modes = list(dict.fromkeys(m.strip() for m in modes if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ReproduceError(f"unknown mode(s) {', '.join(unknown) or '(none given)'}: use "
                             f"{' and/or '.join(MODES)}, e.g. --modes paper,improved")
    images = load_images(study, data, n)
    report = Reproduction(study=study, images=images)
    warning = count_check(study, images.truth)
    if warning:
        report.notes.append(warning)
        print(f"glue-vlm: {warning}", file=log)
    report.out = Path(out if out is not None else f"reproduce-{study.name}")
    try:
        report.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReproduceError(f"cannot create the output folder {report.out}: "
                             f"{exc.strerror}") from None

    engines = {mode: engine_for(mode, backend, options, max_new_tokens) for mode in modes}
    dollars = 0.0
    for mode, engine in engines.items():
        estimate = engine.estimate_cost(len(images.truth), study.task(mode))
        dollars += estimate.dollars or 0.0
        print(f"glue-vlm: {mode} mode: {study.task(mode).slug} with {engine.name} "
              f"{engine.model}: {estimate.describe()}", file=log)
    if max_cost is not None and dollars > max_cost:
        raise ReproduceError(f"estimated cost ${dollars:,.2f} is above --max-cost "
                             f"${max_cost:,.2f}: lower --n or raise the limit")

    source = CubeSource(images.pixels)
    rows = np.arange(len(images.truth))
    with ResultStore(store) as results:
        for mode, engine in engines.items():
            task = study.task(mode)
            bar = progress() if progress else None
            with engine:
                result = classify(source, rows, task, engine, store=results, progress=bar)
            if bar:
                bar(result.progress, final=True)
            report.runs.append(_score(report, mode, task, engine, result))
    _write_predictions(report)
    return report


def _score(report: Reproduction, mode: str, task: Task, engine: Backend,
           result: RunResult) -> ModeRun:
    labels = report.study.labels  # both modes' tasks share this label order
    confidence = result.confidence if np.isfinite(result.confidence).any() else None
    evaluation = evaluate(report.images.truth, list(result.labels), labels=labels,
                          confidence=confidence)
    plot = report.out / f"{report.study.name}_{mode}_confusion.png"
    plot_confusion(evaluation, plot, title=f"{report.study.name}, {mode} mode: accuracy "
                   f"{evaluation.accuracy:.3f} (n = {evaluation.n})")
    return ModeRun(mode=mode, task=task, engine=f"{engine.name} {engine.model}",
                   result=result, evaluation=evaluation, plot=plot)


def _write_predictions(report: Reproduction) -> None:
    from astropy.table import Table

    table = Table({"index": np.arange(len(report.images.truth)),
                   "truth": np.array(report.images.truth, dtype=str)})
    for run in report.runs:
        table[f"{run.mode}_label"] = np.asarray(run.result.labels, dtype=str)
        table[f"{run.mode}_confidence"] = run.result.confidence
    table.meta["study"] = f"Tanoglidis & Jain 2024: {report.study.title}"
    table.meta["tasks"] = {run.mode: run.task.slug for run in report.runs}
    table.write(report.out / f"{report.study.name}_predictions.ecsv", overwrite=True)


# -- the report ----------------------------------------------------------------------------
def format_report(report: Reproduction) -> str:
    """The study's numbers beside each mode's, then each mode's full evaluation."""
    study, labels = report.study, report.study.labels
    n = len(report.images.truth)
    lines = [f"{study.title}: Tanoglidis & Jain 2024 protocol, first {n} images of "
             f"{report.images.origin}", ""]
    rows = [["", "n", "accuracy", "unclassified", *(f"{lab} P/R" for lab in labels)]]
    for pub in study.published:
        ev = pub.evaluation(labels)
        rows.append([pub.source, str(pub.n or "-"), pub.accuracy,
                     str(ev.n_unclassified) if ev else "-", *_precision_recall(ev, labels)])
    for run in report.runs:
        ev = run.evaluation
        rows.append([f"this tool: {run.mode} mode", str(ev.n), f"{ev.accuracy:.3f}",
                     str(ev.n_unclassified), *_precision_recall(ev, labels)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    lines += ["", "P/R: precision/recall per class. Rows without a count are other work "
              "on other images (context, not the same test)."]
    lines += report.notes
    for run in report.runs:
        progress = run.result.progress
        lines += ["", f"== {run.mode} mode: task {run.task.slug}, engine {run.engine}; "
                  f"{progress.called} answered now, {progress.cached} from the store",
                  run.evaluation.format()]
        reasons = _reasons(run.result)
        if reasons:
            lines.append("why rows are unclassified: " + "; ".join(
                f"{count} x {reason}" for reason, count in reasons))
        lines.append(f"confusion matrix: {run.plot}")
    if report.out is not None:
        lines += ["", f"per-image predictions: "
                  f"{report.out / (study.name + '_predictions.ecsv')}"]
    return "\n".join(lines)


def _reasons(result: RunResult, most: int = 3) -> list[tuple[str, int]]:
    """Why rows went unclassified, most frequent first."""
    counts: dict[str, int] = {}
    for reason in result.errors.values():
        counts[reason] = counts.get(reason, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])[:most]


def _precision_recall(ev: Evaluation | None, labels: Sequence[str]) -> list[str]:
    if ev is None:
        return ["-"] * len(labels)
    return [f"{ev.precision[lab]:.3f}/{ev.recall[lab]:.3f}" for lab in labels]
