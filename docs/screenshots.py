"""Screenshots of Glue with the VLM Classifier panel, before, during and after a run.

    .venv/bin/python docs/screenshots.py [--out docs]

Offscreen; the demo catalog (Hubble Deep Field sources) classified by the tiny random
LLaVA-NeXT of the tests, so the classes in the pictures are meaningless: they show the
mechanics, not a model's skill.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SIZE = (1500, 940)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args(argv)
    out = Path(args.out)

    from glue.core.roi import RectangularROI
    from qtpy import QtCore, QtWidgets

    from glue_vlm.demo import write_demo
    from glue_vlm.glue.demo import demo_application
    from glue_vlm.testing.tiny_llava import build_tiny_llava_next

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        catalog_path, _ = write_demo(tmp / "demo.ecsv")
        model = build_tiny_llava_next(tmp / "tiny-llava")
        app, panel = demo_application(catalog_path)
        app.resize(*SIZE)
        app.show()
        catalog = panel.state.catalog
        scatter, image_viewer = app.viewers[0]
        app.tab_widget.currentWidget().tileSubWindows()

        scatter.apply_roi(RectangularROI(4.5, 20, -6, -3))  # resolved sources
        state = panel.state
        state.engine_kind, state.model, state.device = "local", str(model), "cpu"
        state.batch_size = 2
        state.store_path = str(tmp / "store.sqlite")
        state.size = "48"

        def settle():
            for _ in range(5):
                QtWidgets.QApplication.processEvents()
            panel.refresh_preview()
            QtWidgets.QApplication.processEvents()

        def grab(name):
            settle()
            app.grab().save(str(out / name))
            print(f"wrote {out / name}")

        grab("panel-before.png")
        shots = []

        def during(count):
            if not shots and count >= state.n_rows // 3:
                shots.append(count)
                grab("panel-during.png")

        run = panel.classify()
        run.written.connect(during)
        loop = QtCore.QEventLoop()
        run.finished.connect(loop.quit)
        loop.exec()

        panel.subsets_per_class()
        bar = panel.scroll.verticalScrollBar()
        bar.setValue(bar.maximum())
        layer = next(ls for ls in scatter.state.layers if ls.layer is catalog)
        layer.cmap_mode = "Linear"
        layer.cmap_att = catalog.id["galaxy_morphology_code"]
        grab("panel-after.png")
        app.close()


if __name__ == "__main__":
    main()
