"""``glue-vlm``: classify catalogs, evaluate labels, list tasks. Thin: parse, call, print.

Every user error ends as one ``glue-vlm: error: ...`` line and exit status 1, before
anything is written; the output table is written whole or not at all.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


class UserError(Exception):
    """Bad input: printed as one line, exit status 1."""


# -- argument parsing ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glue-vlm", description="Zero-shot classification of astronomical images "
        "with vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("tasks", help="list the preset tasks")

    demo = sub.add_parser("demo", help="open Glue on the Hubble Deep Field demo",
                          description="Detect sources in the Hubble Deep Field image "
                          "that ships with scikit-image, write them with their stamps, "
                          "and open Glue on them with the VLM Classifier panel.")
    demo.add_argument("--no-gui", action="store_true", help="write files, open no window")
    demo.add_argument("-o", "--output", default="demo.ecsv", help="catalog to write; the "
                      "stamps go beside it as <name>_stamps.npy (default demo.ecsv)")

    cls = sub.add_parser("classify", help="classify the rows of a catalog table",
                         description="Classify catalog rows; writes the input table plus "
                         "<task>_label, _code, _confidence and _p_<label> columns.")
    cls.add_argument("input", help="catalog table (FITS, ECSV, CSV, Parquet)")
    cls.add_argument("-o", "--output", required=True, help="output table; format from "
                     "its extension")
    cls.add_argument("--overwrite", action="store_true", help="replace an existing output")
    cls.add_argument("--task", required=True, help="preset name (see 'glue-vlm tasks') "
                     "or a task .toml file")

    src = cls.add_argument_group("stamp source (one of --stamps, --image, --path-col)")
    src.add_argument("--stamps", help="cube of stamps (.npy or FITS), N x H x W [x 3], "
                     "row-aligned with the table")
    src.add_argument("--image", help="a FITS image to cut stamps from")
    src.add_argument("--ext", default=None, help="FITS extension of --image/--stamps "
                     "(default: the first with data)")
    src.add_argument("--x-col", help="pixel x column (0-based) for --image")
    src.add_argument("--y-col", help="pixel y column (0-based) for --image")
    src.add_argument("--ra-col", help="RA column (deg) for --image with a WCS")
    src.add_argument("--dec-col", help="Dec column (deg) for --image with a WCS")
    src.add_argument("--size", default="64", help="cutout size: pixels (64) or an angle "
                     "(20arcsec); default 64")
    src.add_argument("--path-col", help="column of image file paths (FITS, PNG, JPEG)")
    src.add_argument("--stretch", default="asinh", choices=["asinh", "log", "sqrt", "linear"])
    src.add_argument("--interval", default="percentile", choices=["percentile", "zscale"])

    sel = cls.add_argument_group("row selection")
    sel.add_argument("--rows", help="a slice START:STOP of row numbers (0-based)")
    sel.add_argument("--select-col", help="a boolean column: classify rows where true")

    add_engine_arguments(cls.add_argument_group("engine"), with_mode=True)

    ev = sub.add_parser("evaluate", help="compare a label column with a truth column")
    ev.add_argument("table", help="table with predicted and true labels")
    ev.add_argument("--pred-col", required=True, help="predicted label column")
    ev.add_argument("--truth-col", required=True, help="true label column")
    ev.add_argument("--confidence-col", help="confidence column (default: the task's "
                    "_confidence column next to --pred-col, if any)")
    ev.add_argument("--plot", help="write the confusion matrix to this PNG")

    rep = sub.add_parser("reproduce", help="rerun the Tanoglidis & Jain (2024) study",
                         description="Classify the study's first 500 images in its order "
                         "with its published prompt (paper mode) and with this tool's "
                         "(improved mode); print the study's numbers beside the new ones "
                         "and write confusion matrices as PNG.")
    rep.add_argument("study", choices=["lsbg", "morphology"], help="which of the two tasks")
    rep.add_argument("--data", required=True, help="lsbg: folder with X_data_1..5.npy and "
                     "y_labels.npy (github.com/dtanoglidis/UPenn_DS_Hangout); morphology: "
                     "GalaxyMNIST's train_dataset.hdf5 or its folder")
    rep.add_argument("--modes", default="paper,improved", help="paper, improved or both "
                     "(default paper,improved)")
    rep.add_argument("--n", type=int, default=500, help="images, from the first "
                     "(default 500, as in the study)")
    rep.add_argument("--out", help="folder for the PNGs and the per-image predictions "
                     "(default reproduce-STUDY)")
    add_engine_arguments(rep.add_argument_group(
        "engine (as for classify; the mode picks how it answers)"), with_mode=False)
    rep.add_argument("--max-new-tokens", type=int, help="local paper mode: longest answer "
                     "in tokens (default 200, as in the study)")
    rep.set_defaults(mode=None)  # each protocol mode sets its own
    return parser


def add_engine_arguments(group, with_mode: bool) -> None:
    group.add_argument("--backend", default="openai", help="openai (GPT-4o and any "
                       "OpenAI-compatible server), local (transformers), or "
                       "package.module:Class")
    group.add_argument("--model", help="model name or local directory")
    group.add_argument("--base-url", action="append", help="OpenAI-compatible server URL; "
                       "repeat for several replicas")
    group.add_argument("--concurrency", type=int, help="requests in flight (openai)")
    group.add_argument("--detail", choices=["low", "high", "auto"],
                       help="image detail (openai)")
    group.add_argument("--batch-api", action="store_true", default=None,
                       help="use OpenAI's Batch API (half price, up to 24 h)")
    group.add_argument("--max-cost", type=float, help="refuse to start when the estimated "
                       "cost in dollars is higher")
    group.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (local)")
    if with_mode:
        group.add_argument("--mode", choices=["score", "generate"], help="local: class "
                           "probabilities in one pass (score) or free text (generate)")
        group.add_argument("--max-new-tokens", type=int, help="local generate mode: "
                           "longest answer in tokens")
    group.add_argument("--batch-size", type=int, help="stamps per engine call")
    group.add_argument("--dtype", help="local: float32, bfloat16, float16")
    group.add_argument("--quantization", choices=["4bit", "8bit"], help="local, CUDA only")
    group.add_argument("--trust-remote-code", action="store_true", default=None,
                       help="local: run code shipped with the model (off unless given)")
    group.add_argument("--store", help="result store file (default: $GLUE_VLM_STORE or "
                       "the user cache)")


# -- tables ------------------------------------------------------------------------------
def read_table(path: str):
    from astropy.table import Table

    if not Path(path).is_file():
        raise UserError(f"no such table file: {path}")
    try:
        return Table.read(path)
    except Exception as exc:  # astropy raises many types for unreadable files
        raise UserError(f"cannot read table {path}: {exc}") from None


def require_columns(table, names: list[str], what: str) -> None:
    missing = [n for n in names if n not in table.colnames]
    if missing:
        raise UserError(f"{what}: column(s) {', '.join(missing)} not in the table "
                        f"(it has: {', '.join(table.colnames[:20])})")


def check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"output {path} exists: pass --overwrite to replace it")
    if path.is_dir():
        raise UserError(f"output {path} is a directory")
    probe = path.parent / f".{path.name}.probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write output {path}: {exc.strerror}") from None


def write_table_atomically(table, path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename it, so a failed write never
    leaves a half-written table."""
    import warnings

    tmp = path.parent / f".{path.stem}.partial{''.join(path.suffixes)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FITS keyword-length chatter
            table.write(tmp, overwrite=True)
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write output {path}: {exc}") from None


# -- stamp source ------------------------------------------------------------------------
def _parse_size(text: str):
    from astropy import units as u

    try:
        return int(text)
    except ValueError:
        pass
    try:
        size = u.Quantity(text)
        size.to(u.arcsec)
    except (TypeError, ValueError, u.UnitsError):
        raise UserError(f"--size {text!r}: give pixels (64) or an angle (20arcsec)") from None
    return size


def build_source(args, table):
    from .stamps import CubeSource, ImageSource, PathSource

    chosen = [name for name in ("stamps", "image", "path_col") if getattr(args, name)]
    if len(chosen) != 1:
        raise UserError("give exactly one stamp source: --stamps CUBE, --image FITS or "
                        "--path-col COLUMN")
    image_path = args.stamps or args.image
    if image_path and not Path(image_path).is_file():
        raise UserError(f"no such file: {image_path}")
    ext = int(args.ext) if args.ext is not None and args.ext.isdigit() else args.ext
    if args.stamps:
        return CubeSource.from_file(args.stamps, ext=ext, n_rows=len(table))
    if args.path_col:
        require_columns(table, [args.path_col], "--path-col")
        base = Path(args.input).resolve().parent
        return PathSource([str(p) for p in table[args.path_col]], base_dir=base)
    size = _parse_size(args.size)
    if args.ra_col or args.dec_col:
        require_columns(table, [args.ra_col or "--ra-col", args.dec_col or "--dec-col"],
                        "sky positions")
        return ImageSource.from_fits(args.image, ext=ext, size=size,
                                     ra=np.asarray(table[args.ra_col]),
                                     dec=np.asarray(table[args.dec_col]))
    if args.x_col or args.y_col:
        require_columns(table, [args.x_col or "--x-col", args.y_col or "--y-col"],
                        "pixel positions")
        return ImageSource.from_fits(args.image, ext=ext, size=size,
                                     x=np.asarray(table[args.x_col]),
                                     y=np.asarray(table[args.y_col]))
    raise UserError("--image needs positions: --ra-col/--dec-col or --x-col/--y-col")


def select_rows(args, n_rows: int, table) -> np.ndarray:
    mask = np.ones(n_rows, dtype=bool)
    if args.rows:
        try:
            start, _, stop = args.rows.partition(":")
            window = slice(int(start) if start else None, int(stop) if stop else None)
        except ValueError:
            raise UserError(f"--rows {args.rows!r}: use START:STOP, e.g. 0:1000") from None
        keep = np.zeros(n_rows, dtype=bool)
        keep[window] = True
        mask &= keep
    if args.select_col:
        require_columns(table, [args.select_col], "--select-col")
        column = np.asarray(table[args.select_col])
        if column.dtype != bool:
            raise UserError(f"--select-col {args.select_col}: column must be boolean, "
                            f"is {column.dtype}")
        mask &= column
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        raise UserError("the row selection is empty: nothing to classify")
    return rows


# -- progress ---------------------------------------------------------------------------
class ProgressLine:
    """A progress bar on stderr: redrawn in place on a terminal, a line every few
    seconds in a log."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._tty = self.stream.isatty()
        self.interval = 0.25 if self._tty else 10.0  # a log file gets a line now and then
        self._last = 0.0

    def __call__(self, progress, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.interval:
            return
        self._last = now
        width = 24
        filled = int(width * progress.done / max(progress.total, 1))
        eta = progress.eta
        eta_text = "?" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {progress.done}/{progress.total}"
                f"  cached {progress.cached}  failed {progress.failed}"
                f"  {progress.rate:.1f}/s  ETA {eta_text}")
        self.stream.write(("\r" + line + ("\n" if final else "")) if self._tty else line + "\n")
        self.stream.flush()


# -- commands ---------------------------------------------------------------------------
def cmd_tasks(args) -> int:
    from .tasks import PRESETS

    for task in PRESETS.values():
        print(f"{task.slug:22s} {task.title}")
        print(f"{'':22s} labels: {', '.join(task.label_names)}")
    return 0


def cmd_demo(args) -> int:
    from .demo import write_demo

    output = Path(args.output)
    check_writable(output, overwrite=True)
    catalog, stamps = write_demo(output)
    print(f"glue-vlm: wrote {catalog} ({stamps.name} beside it)", file=sys.stderr)
    if args.no_gui:
        print(f"classify with:\n  glue-vlm classify {catalog} --stamps {stamps} "
              f"--task galaxy-morphology --backend openai -o classified.ecsv")
        return 0
    from .glue.demo import demo_application

    app, _ = demo_application(catalog)
    app.start()
    return 0


def _engine_options(args) -> dict:
    return {"model": args.model, "base_url": args.base_url, "concurrency": args.concurrency,
            "detail": args.detail, "batch_api": args.batch_api, "device": args.device,
            "mode": args.mode, "batch_size": args.batch_size, "dtype": args.dtype,
            "quantization": args.quantization, "trust_remote_code": args.trust_remote_code,
            "max_new_tokens": args.max_new_tokens}


def cmd_classify(args) -> int:
    from .backends.base import create_backend
    from .columns import column_names, empty_columns, fill_columns, provenance
    from .run import classify
    from .stamps import StampSettings
    from .store import ResultStore
    from .tasks import get_task

    task = get_task(args.task)
    output = Path(args.output)
    check_writable(output, args.overwrite)
    table = read_table(args.input)
    source = build_source(args, table)
    rows = select_rows(args, len(table), table)
    store = ResultStore(args.store)
    if store.notice:
        print(f"glue-vlm: warning: {store.notice}", file=sys.stderr)
    backend = create_backend(args.backend, **_engine_options(args))
    estimate = backend.estimate_cost(len(rows), task)
    print(f"glue-vlm: {task.slug} on {len(rows)} rows with {backend.name} "
          f"{backend.model}: {estimate.describe()}", file=sys.stderr)
    if args.max_cost is not None and (estimate.dollars or 0.0) > args.max_cost:
        raise UserError(f"estimated cost ${estimate.dollars:,.2f} is above --max-cost "
                        f"${args.max_cost:,.2f}: select fewer rows or raise the limit")

    cancel = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        if cancel.is_set():  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        cancel.set()
        print("\nglue-vlm: stopping after the current batch (Ctrl-C again to abort)",
              file=sys.stderr)

    signal.signal(signal.SIGINT, on_interrupt)
    bar = ProgressLine()
    settings = StampSettings(stretch=args.stretch, interval=args.interval)
    try:
        with backend, store:
            result = classify(source, rows, task, backend, store=store,
                              stamp_settings=settings, progress=bar, cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, previous)
    bar(result.progress, final=True)

    columns = empty_columns(task, len(table))
    for name in column_names(task):  # a rerun updates earlier columns in place
        if name in table.colnames:
            columns[name][:] = np.asarray(table[name])
    fill_columns(columns, result)
    for name, values in columns.items():
        table[name] = values
    table.meta["glue_vlm"] = provenance(task, backend, store, result)
    write_table_atomically(table, output)
    summarize(result, output)
    return 130 if result.cancelled else 0


def summarize(result, output: Path) -> None:
    counts = np.bincount(result.codes[result.codes >= 0], minlength=len(result.task.labels))
    parts = [f"{name} {count}" for name, count in zip(result.task.label_names, counts)]
    print(f"glue-vlm: wrote {output}: {', '.join(parts)}; failed {len(result.errors)}",
          file=sys.stderr)
    usage = result.usage
    print(f"glue-vlm: {result.progress.called} rows asked, {result.progress.cached} from the "
          f"store; tokens used: {usage.prompt_tokens:,} input + {usage.completion_tokens:,} "
          "output", file=sys.stderr)
    reasons: dict[str, int] = {}
    for reason in result.errors.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1])[:5]:
        print(f"  {count} x {reason}", file=sys.stderr)
    if result.cancelled:
        print("glue-vlm: interrupted; run the same command again to finish the rest "
              "(answers so far are stored)", file=sys.stderr)
    elif result.errors:
        print("glue-vlm: run the same command again to retry the failed rows",
              file=sys.stderr)


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, plot_confusion

    table = read_table(args.table)
    require_columns(table, [args.pred_col, args.truth_col], "evaluate")
    confidence = None
    conf_col = args.confidence_col
    if conf_col is None and args.pred_col.endswith("_label"):
        guess = args.pred_col[: -len("_label")] + "_confidence"
        conf_col = guess if guess in table.colnames else None
    if conf_col is not None:
        require_columns(table, [conf_col], "--confidence-col")
        confidence = np.asarray(table[conf_col], dtype=float)
    labels = table.meta.get("glue_vlm", {}).get("labels")  # class codes map to these
    try:
        report = evaluate(table[args.truth_col], table[args.pred_col], labels=labels,
                          confidence=confidence)
    except ValueError as exc:
        raise UserError(f"cannot evaluate {args.pred_col} against {args.truth_col}: "
                        f"{exc}") from None
    print(report.format())
    if args.plot:
        plot_confusion(report, args.plot, title=f"{args.pred_col} vs {args.truth_col}")
        print(f"confusion matrix written to {args.plot}")
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import PAPER_MAX_NEW_TOKENS, ReproduceError, format_report, reproduce

    options = _engine_options(args)
    options.pop("max_new_tokens")  # only the paper mode's local engine takes it
    try:
        report = reproduce(args.study, args.data, backend=args.backend, options=options,
                           modes=args.modes.split(","), n=args.n, out=args.out,
                           store=args.store, max_cost=args.max_cost,
                           max_new_tokens=args.max_new_tokens or PAPER_MAX_NEW_TOKENS,
                           progress=ProgressLine)
    except ReproduceError as exc:
        raise UserError(str(exc)) from None
    print(format_report(report))
    return 0


COMMANDS = {"tasks": cmd_tasks, "demo": cmd_demo, "classify": cmd_classify,
            "evaluate": cmd_evaluate, "reproduce": cmd_reproduce}


def main(argv: list[str] | None = None) -> int:
    from .backends.base import BackendError
    from .stamps import StampError
    from .store import StoreError
    from .tasks import TaskError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UserError, TaskError, StampError, StoreError, BackendError) as exc:
        print(f"glue-vlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("glue-vlm: aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
