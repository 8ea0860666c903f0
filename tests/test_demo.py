"""The demo catalog: real sources detected in the Hubble Deep Field image."""

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from glue_vlm.cli import main
from glue_vlm.demo import demo_image


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.ecsv"
    assert main(["demo", "--no-gui", "-o", str(out)]) == 0
    return Table.read(out), np.load(out.with_name("demo_stamps.npy"))


def test_finds_hundreds_of_sources_with_stamps(demo_files):
    table, stamps = demo_files
    assert 300 <= len(table) <= 5000
    assert stamps.shape == (len(table), 64, 64, 3) and stamps.dtype == np.uint8
    for name in ("x", "y", "area", "flux", "surface_brightness", "half_light_radius",
                 "concentration", "ellipticity"):
        assert name in table.colnames


def test_positions_land_on_flux_peaks(demo_files):
    table, stamps = demo_files
    gray = demo_image().astype(float).sum(axis=2)
    brightest = np.argsort(-np.asarray(table["flux"]))[:10]
    for row in brightest:
        x, y = float(table["x"][row]), float(table["y"][row])
        xi, yi = int(round(x)), int(round(y))
        box = gray[yi - 8:yi + 9, xi - 8:xi + 9]
        py, px = np.unravel_index(np.argmax(box), box.shape)
        assert abs(py - 8) <= 3 and abs(px - 8) <= 3, (row, x, y)
        # the stamp is centred on the same peak
        stamp = stamps[row].astype(float).sum(axis=2)
        centre = stamp[28:36, 28:36].mean()
        assert centre > np.median(stamp) + 50


def test_engine_pick_follows_what_is_available(monkeypatch):
    from glue_vlm import demo

    assert demo.pick_engine({"OPENAI_API_KEY": "sk-x"})[:2] == ("gpt-4o", "gpt-4o")
    monkeypatch.setattr(demo, "_cached", lambda model: False)
    kind, model, note = demo.pick_engine({"HF_HUB_OFFLINE": "1"})
    assert (kind, model) == ("local", demo.SMALL_LOCAL_MODEL)
    assert "OPENAI_API_KEY" in note and f"hf download {demo.SMALL_LOCAL_MODEL}" in note
    kind, model, note = demo.pick_engine({})  # online: fetched on first use
    assert model == demo.SMALL_LOCAL_MODEL and "downloads it first" in note and "1.8 GB" in note
    monkeypatch.setattr(demo, "_cached", lambda model: True)
    monkeypatch.setattr(demo, "_has_cuda", lambda: True)
    assert demo.pick_engine({})[1] == demo.FULL_LOCAL_MODEL
    monkeypatch.setattr(demo, "_has_cuda", lambda: False)
    assert demo.pick_engine({})[1] == demo.SMALL_LOCAL_MODEL


def test_demo_opens_glue_with_both_viewers_and_the_panel(qtbot, tmp_path, monkeypatch):
    from glue_qt.viewers.image import ImageViewer
    from glue_qt.viewers.scatter import ScatterViewer

    from glue_vlm import demo
    from glue_vlm.glue.demo import demo_application
    from glue_vlm.glue.panel import ClassifierPanel

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(demo, "_cached", lambda model: False)
    catalog_path, _ = demo.write_demo(tmp_path / "demo.ecsv")
    app, panel = demo_application(catalog_path)
    try:
        app.resize(1400, 900)
        app.show()
        qtbot.waitExposed(app)
        viewers = app.viewers[0]
        assert {type(v) for v in viewers} == {ScatterViewer, ImageViewer}
        assert isinstance(panel, ClassifierPanel) and panel.isVisible()
        assert panel.state.catalog.label == "demo"
        assert panel.state.n_rows == 0 and panel.state.rows_note  # asks for a selection
        assert "No engine is ready" in panel.status.text()
        shot = Path(os.environ.get("GLUE_VLM_SCREENSHOT_DIR", tmp_path)) / "demo.png"
        app.grab().save(str(shot))
        from PIL import Image

        image = np.asarray(Image.open(shot).convert("L"), dtype=float)
        assert image.shape[1] >= 1000 and image.std() > 10  # drawn, not blank
        # the panel is docked beside the viewers, not over them
        panel_box = panel.geometry()
        for viewer in viewers:
            assert not panel_box.intersects(viewer.geometry().translated(
                viewer.parentWidget().mapTo(app, viewer.pos()) - viewer.pos()))
    finally:
        panel.shutdown()
        app.close()
