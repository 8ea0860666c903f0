"""Does Glue stay responsive while the panel classifies? Longest main-thread stall.

    QT_QPA_PLATFORM=offscreen .venv/bin/python bench/gui.py [--rows 500] [--latency 0.05]
        [--batch-size 8] [--engine latency|local]

A GlueApplication holds a catalog of ``--rows`` galaxies and their stamp cube (64 x 64
float stamps, stretched on the way), a scatter viewer of the catalog coloured by the
task's ``_code`` column (so every chunk of results written to the catalog makes the
plot redraw), and the VLM Classifier panel. A main-thread QTimer ticks every 10 ms; the
gaps between ticks are the time the application could not react. The panel's run
(worker thread, results written in throttled chunks on the main thread) is measured
against the baseline of the same classification done blocking on the main thread
(``classify_data`` from Glue's terminal), in the same process.

Engines: ``latency`` (default) answers from the pixels after sleeping ``--latency``
seconds per batch, like a remote server; ``local`` is the tiny random LLaVA-NeXT of the
tests through ``LocalBackend`` on the CPU (compute in the worker thread).

Last line: ``gui_max_stall_ms: <longest gap between ticks during the panel's run>``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402

from glue_vlm.backends.base import Backend, Prediction  # noqa: E402

TICK_MS = 10
TASK = "galaxy-morphology"


class LatencyBackend(Backend):
    """Sleeps ``latency`` seconds per batch, then answers from a hash of the pixels."""

    name = "latency"
    accepts = "array"
    gives_probabilities = True
    latency = 0.05

    def __init__(self, model: str = "latency-v1", batch_size: int = 8):
        self.model = model
        self.batch_size = int(batch_size)

    def predict(self, stamps, task):
        time.sleep(self.latency)
        out = []
        for stamp in stamps:
            seed = int(hashlib.sha256(stamp.pixels.tobytes()).hexdigest()[:8], 16)
            weights = np.random.default_rng(seed).random(len(task.labels)) + 0.1
            probs = dict(zip(task.label_names, (weights / weights.sum()).tolist()))
            out.append(Prediction(label=max(probs, key=probs.get), probabilities=probs,
                                  method="bench"))
        return out


class TickRecorder:
    """Times between ticks of a main-thread timer."""

    def __init__(self):
        from qtpy import QtCore

        self.timer = QtCore.QTimer()
        self.timer.setTimerType(QtCore.Qt.PreciseTimer)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.times: list[float] = []

    def _tick(self):
        self.times.append(time.perf_counter())

    def start(self):
        self.times = [time.perf_counter()]
        self.timer.start()

    def stop(self) -> np.ndarray:
        self.timer.stop()
        self.times.append(time.perf_counter())
        return np.diff(np.array(self.times)) * 1000.0


def build_scene(n_rows: int, with_viewer: bool = True):
    from glue.core import Data
    from glue_qt.app import GlueApplication
    from glue_qt.viewers.scatter import ScatterViewer

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64] - 31.5
    sigma = rng.uniform(2, 10, n_rows)
    ellipticity = rng.uniform(0.2, 1.0, n_rows)
    cube = np.exp(-(xx[None] ** 2 + (yy[None] / ellipticity[:, None, None]) ** 2)
                  / (2 * sigma[:, None, None] ** 2))
    cube = (cube + rng.normal(0, 0.03, cube.shape)).astype(np.float32)
    catalog = Data(label="catalog", size=sigma, ellipticity=ellipticity,
                   mag=rng.uniform(18, 24, n_rows))
    stamps = Data(label="stamps", cube=cube)
    app = GlueApplication()
    app.data_collection.extend([catalog, stamps])
    if not with_viewer:
        return app, catalog, stamps, None
    viewer = app.new_data_viewer(ScatterViewer, data=catalog)
    viewer.state.x_att = catalog.id["size"]
    viewer.state.y_att = catalog.id["mag"]
    return app, catalog, stamps, viewer


def colour_by_code(catalog, viewer, task):
    """Create the task's columns (all unclassified) and colour the plot by the code."""
    from glue_vlm.glue.columns import component_id, write_result
    from glue_vlm.run import RunResult

    write_result(catalog, RunResult.empty(task, []))
    layer = next(ls for ls in viewer.state.layers if ls.layer is catalog)
    layer.cmap_mode = "Linear"
    layer.cmap_att = component_id(catalog, f"{task.column_prefix}_code")


def configure(panel, args, store: Path, model_dir: Path | None):
    state = panel.state
    state.rows_from = "all"
    state.task_preset = TASK
    state.source_kind = "cube"
    state.store_path = str(store)
    state.batch_size = args.batch_size
    if args.engine == "local":
        state.engine_kind, state.model, state.device = "local", str(model_dir), "cpu"
    else:
        state.engine_kind, state.engine_spec = "plugin", "__main__:LatencyBackend"


def panel_run(app, panel) -> tuple[np.ndarray, float, object]:
    from qtpy import QtCore, QtWidgets

    QtWidgets.QApplication.processEvents()  # draws left over from setting up
    recorder = TickRecorder()
    loop = QtCore.QEventLoop()
    recorder.start()
    began = time.perf_counter()
    run = panel.classify()
    if run is None:
        raise SystemExit(f"the panel could not start: {panel.status.text()}")
    run.finished.connect(loop.quit)
    loop.exec()
    elapsed = time.perf_counter() - began
    return recorder.stop(), elapsed, panel.last_outcome


def blocking_run(catalog, stamps, panel, store: Path) -> tuple[np.ndarray, float]:
    """The same rows classified on the main thread (as from Glue's terminal)."""
    from qtpy import QtWidgets

    from glue_vlm.glue.scripting import classify_data

    state = panel.state
    QtWidgets.QApplication.processEvents()
    recorder = TickRecorder()
    recorder.start()
    began = time.perf_counter()
    with state.create_engine() as engine:
        classify_data(catalog, state.stamp_source(), state.task(), engine,
                      store=store, stamp_settings=state.stamp_settings())
    QtWidgets.QApplication.processEvents()
    elapsed = time.perf_counter() - began
    return recorder.stop(), elapsed


def redraw_ms(viewer, times: int = 7) -> float:
    """Median time of one full redraw of the viewer, with nothing else running."""
    canvas = viewer.figure.canvas
    canvas.draw()  # warm up
    spent = []
    for _ in range(times):
        began = time.perf_counter()
        canvas.draw()
        spent.append((time.perf_counter() - began) * 1000.0)
    return float(np.median(spent))


def describe(gaps: np.ndarray) -> str:
    p50, p99 = np.percentile(gaps, [50, 99])
    return f"tick gaps ms: p50 {p50:.1f}  p99 {p99:.1f}  max {gaps.max():.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--latency", type=float, default=0.05,
                        help="seconds per batch of the latency engine")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engine", choices=["latency", "local"], default="latency")
    parser.add_argument("--no-viewer", action="store_true",
                        help="no scatter viewer: the panel's own cost, without redraws")
    args = parser.parse_args(argv)
    LatencyBackend.latency = args.latency

    from glue_vlm.glue.plugin import open_panel
    from glue_vlm.tasks import PRESETS

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = None
        if args.engine == "local":
            from glue_vlm.testing.tiny_llava import build_tiny_llava_next

            model_dir = build_tiny_llava_next(tmp / "tiny-llava")
        app, catalog, stamps, viewer = build_scene(args.rows, not args.no_viewer)
        if viewer is not None:
            colour_by_code(catalog, viewer, PRESETS[TASK])
        panel = open_panel(app.session, app.data_collection)
        configure(panel, args, tmp / "panel.sqlite", model_dir)
        if args.engine == "local":  # load the model once, outside the timing
            with panel.state.create_engine() as engine:
                engine.load()

        redraw = redraw_ms(viewer) if viewer is not None else None
        gaps, elapsed, outcome = panel_run(app, panel)
        if outcome.error:
            raise SystemExit(f"the run failed: {outcome.error}")
        blocking_gaps, blocking_elapsed = blocking_run(catalog, stamps, panel,
                                                       tmp / "blocking.sqlite")
        app.close()

    print(f"{args.rows} rows of 64 x 64 stamps, engine {args.engine}"
          + (f" ({args.latency * 1000:.0f} ms a batch)" if args.engine == "latency" else "")
          + f", batch {args.batch_size}, timer every {TICK_MS} ms, {os.cpu_count()} cores, "
          + ("no viewer" if viewer is None else "a scatter viewer coloured by the code"))
    print(f"panel (worker thread, chunked writes): {elapsed:.2f} s, "
          f"{args.rows / elapsed:.0f} rows/s, {outcome.written} rows written; "
          f"{describe(gaps)}")
    if redraw is not None:
        print(f"for scale: one redraw of the coloured scatter viewer, idle: {redraw:.1f} ms")
    print(f"baseline, blocking on the main thread: {blocking_elapsed:.2f} s; "
          f"{describe(blocking_gaps)}")
    print(f"gui_max_stall_ms: {gaps.max():.1f}")


if __name__ == "__main__":
    main()
