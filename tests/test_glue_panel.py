"""Acceptance: the panel inside a real GlueApplication (offscreen), classifying with the
tiny random LLaVA-NeXT through the local engine.

A catalog (ECSV) and an image (FITS with a WCS) are loaded from files, linked through
RA/Dec, a subset is drawn with a ROI in a scatter viewer, and the panel is opened
through its menu entry.
"""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from qtpy import QtCore, QtWidgets

from glue_vlm.columns import column_names
from glue_vlm.glue.columns import component_id, review_column
from glue_vlm.glue.panel import ClassifierPanel
from glue_vlm.glue.plugin import MENU_LABEL
from glue_vlm.glue.sources import image_source
from glue_vlm.run import classify
from glue_vlm.tasks import PRESETS

pytestmark = pytest.mark.slow

TASK = PRESETS["galaxy-morphology"]
PREFIX = TASK.column_prefix
N_ROWS = 24
SECRET = "sk-test-panel-key-0123456789abcdef"


def make_files(folder):
    """A FITS image with a TAN WCS and blobs of different widths, and a catalog of
    those blobs (ra, dec, mag, size, pixel x/y, a 'truth' label)."""
    rng = np.random.default_rng(5)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.1, 2.2]
    wcs.wcs.crpix = [100, 80]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    height, width = 160, 200
    x = 20 + (np.arange(N_ROWS) % 6) * 32.0 + rng.uniform(-2, 2, N_ROWS)
    y = 20 + (np.arange(N_ROWS) // 6) * 38.0 + rng.uniform(-2, 2, N_ROWS)
    sigma = rng.uniform(1.0, 5.0, N_ROWS)
    yy, xx = np.mgrid[:height, :width]
    image = rng.normal(0, 0.05, (height, width))
    for xi, yi, si in zip(x, y, sigma):
        image += np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * si**2))
    fits.PrimaryHDU(image.astype(np.float32), header=wcs.to_header()).writeto(
        folder / "field.fits")
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    catalog = Table({"ra": ra, "dec": dec, "mag": 18 + 0.25 * np.arange(N_ROWS),
                     "size": sigma, "x": x, "y": y,
                     # pixel positions in a larger mosaic (outside this image)
                     "x_mosaic": x + 4000, "y_mosaic": y + 3000,
                     "truth": rng.choice(TASK.label_names, N_ROWS)})
    catalog.write(folder / "catalog.ecsv")
    return folder / "catalog.ecsv", folder / "field.fits"


@pytest.fixture
def app(qtbot):
    from glue_qt.app import GlueApplication

    app = GlueApplication()
    yield app
    panel = app.findChild(ClassifierPanel)
    if panel is not None:
        panel.shutdown()
    app.close()


@pytest.fixture
def scene(app, tmp_path):
    """Catalog and image loaded and linked; a scatter viewer of the catalog."""
    from glue.core.link_helpers import LinkSame
    from glue_qt.viewers.scatter import ScatterViewer

    catalog_path, image_path = make_files(tmp_path)
    catalog = app.load_data(str(catalog_path))
    image = app.load_data(str(image_path))
    app.data_collection.add_link(LinkSame(catalog.id["ra"], image.world_component_ids[1]))
    app.data_collection.add_link(LinkSame(catalog.id["dec"], image.world_component_ids[0]))
    viewer = app.new_data_viewer(ScatterViewer, data=catalog)
    viewer.state.x_att = catalog.id["mag"]
    viewer.state.y_att = catalog.id["size"]
    return app, catalog, image, viewer


def select_mag(app, viewer, low, high):
    """Draw a new rectangular selection over ``low < mag < high``; returns its rows."""
    from glue.core.roi import RectangularROI

    app.session.edit_subset_mode.edit_subset = []
    viewer.apply_roi(RectangularROI(low, high, -100, 100))
    subset = app.session.edit_subset_mode.edit_subset[0].subsets[0]
    return np.flatnonzero(subset.to_mask())


def open_panel(app, model_dir, store):
    action = next(a for a in app._actions["plugins"] if a.text() == MENU_LABEL)
    action.trigger()
    panel = app.findChild(ClassifierPanel)
    assert panel is not None and panel.isVisibleTo(app)
    state = panel.state
    state.task_preset = TASK.slug
    state.source_kind, state.positions, state.size = "image", "linked", "32"
    state.engine_kind, state.model = "local", str(model_dir)
    state.device, state.batch_size = "cpu", 2
    state.store_path = str(store)
    return panel


def run_to_end(qtbot, panel):
    run = panel.classify()
    assert run is not None, panel.status.text()
    with qtbot.waitSignal(run.finished, timeout=120_000):
        pass
    assert not run.is_running()
    return panel.last_outcome


def no_dialogs():
    return [w for w in QtWidgets.QApplication.topLevelWidgets()
            if isinstance(w, (QtWidgets.QMessageBox, QtWidgets.QDialog)) and w.isVisible()]


def columns_of(catalog):
    return {name: np.asarray(catalog[name]) for name in column_names(TASK)}


def test_classify_a_roi_selection_then_rerun_in_place(qtbot, scene, tiny_llava_dir, tmp_path):
    app, catalog, image, viewer = scene
    first = select_mag(app, viewer, 17.9, 19.6)
    assert 4 <= len(first) < N_ROWS
    panel = open_panel(app, tiny_llava_dir, tmp_path / "store.sqlite")
    assert panel.state.catalog is catalog and panel.state.image is image
    assert panel.state.rows_from == "selection" and panel.state.n_rows == len(first)
    panel.refresh_preview()
    shown = [t for t in panel.thumbnails if not t.pixmap().isNull()]
    assert len(shown) == min(len(first), len(panel.thumbnails))
    assert panel.estimate_cost() is not None
    qtbot.waitUntil(lambda: "images" in panel.state.estimate, timeout=60_000)
    assert panel.state.estimate.startswith(f"{len(first)} images")
    assert panel.estimate_label.text() == panel.state.estimate

    outcome = run_to_end(qtbot, panel)
    assert outcome.error is None and not outcome.cancelled, panel.status.text()
    values = columns_of(catalog)
    outside = np.setdiff1d(np.arange(N_ROWS), first)
    assert np.all(values[f"{PREFIX}_code"][first] >= 0)
    assert set(values[f"{PREFIX}_label"][first]) <= set(TASK.label_names)
    assert np.all(values[f"{PREFIX}_label"][outside] == "unclassified")
    assert np.all(values[f"{PREFIX}_code"][outside] == -1)
    assert np.all(np.isnan(values[f"{PREFIX}_confidence"][outside]))
    probs = np.stack([values[f"{PREFIX}_p_{name}"] for name in TASK.label_names], axis=1)
    assert np.allclose(probs[first].sum(axis=1), 1.0, atol=1e-4)
    assert np.all(np.isnan(probs[outside]))
    picked = probs[first, values[f"{PREFIX}_code"][first]]
    assert np.allclose(values[f"{PREFIX}_confidence"][first], picked)

    # the same stamps through the core give the same answers, row for row
    from glue_vlm.backends.local import LocalBackend

    with LocalBackend(model=str(tiny_llava_dir), device="cpu") as engine:
        direct = classify(image_source(catalog, image, size=32), first, TASK, engine)
    assert np.allclose(probs[first], direct.probabilities, atol=1e-4)

    # provenance in the catalog's meta
    meta = catalog.meta["glue_vlm"][TASK.slug]
    assert meta["model"] == str(tiny_llava_dir) and meta["rows_classified"] == len(first)
    assert meta["complete"] and meta["store"] == str(tmp_path / "store.sqlite")

    # the scatter viewer can colour by the class code
    code = component_id(catalog, f"{PREFIX}_code")
    layer = next(ls for ls in viewer.state.layers if ls.layer is catalog)
    assert any(choice is code for choice in type(layer).cmap_att.get_choices(layer))
    layer.cmap_mode, layer.cmap_att = "Linear", code
    assert layer.cmap_vmin == -1 and layer.cmap_vmax == values[f"{PREFIX}_code"].max()

    # one subset per class
    groups = panel.subsets_per_class()
    assert [g.label for g in groups] == [f"{TASK.slug}: {n}" for n in TASK.label_names]
    for i, group in enumerate(groups):
        mask = next(s for s in group.subsets if s.data is catalog).to_mask()
        assert np.array_equal(mask, values[f"{PREFIX}_code"] == i)

    # the least confident classified rows
    panel.state.threshold = float(np.median(values[f"{PREFIX}_confidence"][first]))
    least = panel.select_least_confident()
    mask = next(s for s in least.subsets if s.data is catalog).to_mask()
    expected = np.zeros(N_ROWS, bool)
    expected[first] = values[f"{PREFIX}_confidence"][first] < panel.state.threshold
    assert np.array_equal(mask, expected) and 0 < mask.sum() < len(first)
    assert app.session.edit_subset_mode.edit_subset[0].subsets[0].to_mask()[first].all()

    # a confusion matrix against the truth column, over the rows of the run
    panel.state.truth_att = catalog.id["truth"]
    report = panel.show_confusion()
    assert report is not None and report.n == len(first)
    assert report.confusion.sum() == len(first)

    # a rerun on another selection updates the same components in place
    cids = {name: component_id(catalog, name) for name in column_names(TASK)}
    labels_before = [cid.label for cid in catalog.components]
    second = select_mag(app, viewer, 20.9, 22.1)
    assert panel.state.n_rows == len(second) and not set(second) & set(first)
    outcome = run_to_end(qtbot, panel)
    assert outcome.error is None
    assert {name: component_id(catalog, name) for name in column_names(TASK)} == cids
    assert all(component_id(catalog, name) is cid for name, cid in cids.items())
    labels_after = [cid.label for cid in catalog.components]
    assert labels_after == labels_before and len(set(labels_after)) == len(labels_after)
    again = columns_of(catalog)
    both = np.union1d(first, second)
    assert np.all(again[f"{PREFIX}_code"][both] >= 0)
    assert np.all(again[f"{PREFIX}_code"][np.setdiff1d(np.arange(N_ROWS), both)] == -1)
    assert np.array_equal(again[f"{PREFIX}_code"][first], values[f"{PREFIX}_code"][first])
    # class subsets follow the new values (their cached masks were cleared)
    for i, group in enumerate(groups):
        mask = next(s for s in group.subsets if s.data is catalog).to_mask()
        assert np.array_equal(mask, again[f"{PREFIX}_code"] == i)
    assert no_dialogs() == []


def test_cancel_mid_run_keeps_finished_rows(qtbot, scene, tiny_llava_dir, tmp_path):
    app, catalog, image, viewer = scene
    panel = open_panel(app, tiny_llava_dir, tmp_path / "store.sqlite")
    panel.state.rows_from = "all"

    def cancel_after_two_batches(run):
        # runs in the worker thread, right after a batch is reported
        run.progressed.connect(lambda p: run.cancel() if p.done >= 4 else None,
                               QtCore.Qt.DirectConnection)

    panel.run_created.connect(cancel_after_two_batches)
    outcome = run_to_end(qtbot, panel)
    assert outcome.cancelled and outcome.error is None
    codes = np.asarray(catalog[f"{PREFIX}_code"])
    assert np.all(codes[:4] >= 0) and np.all(codes[4:] == -1)
    assert np.all(np.asarray(catalog[f"{PREFIX}_label"])[4:] == "unclassified")
    assert catalog.meta["glue_vlm"][TASK.slug]["complete"] is False
    assert "cancelled" in panel.status.text() and "4 of 24" in panel.status.text()
    assert panel.classify_button.isEnabled() and not panel.cancel_button.isEnabled()

    # classify again: the first rows come from the store, the rest from the engine
    panel.run_created.disconnect(cancel_after_two_batches)
    progress = []
    panel.run_created.connect(lambda run: run.progressed.connect(progress.append))
    outcome = run_to_end(qtbot, panel)
    assert not outcome.cancelled and progress[-1].cached == 4
    from glue_vlm.backends.local import loaded_models

    assert any(key[0] == str(tiny_llava_dir) for key in loaded_models())  # stays warm
    assert np.all(np.asarray(catalog[f"{PREFIX}_code"]) >= 0)
    assert np.array_equal(np.asarray(catalog[f"{PREFIX}_code"])[:4], codes[:4])


def test_session_keeps_columns_and_provenance_but_no_key(qtbot, scene, tiny_llava_dir,
                                                        transformers_server, tmp_path):
    """Classified over HTTP (``transformers serve``) with an API key typed in the panel:
    the saved session restores columns, review and provenance, and holds no key."""
    from glue_qt.app import GlueApplication

    app, catalog, image, viewer = scene
    rows = select_mag(app, viewer, 17.9, 18.6)
    panel = open_panel(app, tiny_llava_dir, tmp_path / "store.sqlite")
    state = panel.state
    state.engine_kind, state.base_url = "openai-compatible", transformers_server
    state.model, state.api_key = str(tiny_llava_dir), SECRET
    outcome = run_to_end(qtbot, panel)
    assert outcome.error is None and outcome.written == len(rows), panel.status.text()
    meta = catalog.meta["glue_vlm"][TASK.slug]
    assert meta["backend"] == "openai" and SECRET not in repr(catalog.meta)
    state.review_label = TASK.label_names[2]
    assert panel.review_selected() is not None
    before = columns_of(catalog)
    session = tmp_path / "session.glu"
    app.save_session(str(session))
    assert SECRET not in session.read_text()

    restored = GlueApplication.restore_session(str(session), show=False)
    try:
        data = next(d for d in restored.data_collection if d.label == catalog.label)
        for name, values in before.items():
            assert np.array_equal(np.asarray(data[name]), values,
                                  equal_nan=values.dtype.kind == "f"), name
        label = data.get_component(component_id(data, f"{PREFIX}_label"))
        assert list(label.categories) == TASK.label_names + ["unclassified"]
        human = np.asarray(data[review_column(TASK)])
        assert np.all(human[rows] == TASK.label_names[2])
        assert np.all(np.delete(human, rows) == "unreviewed")
        assert data.meta["glue_vlm"] == catalog.meta["glue_vlm"]
    finally:
        restored.close()


def test_problems_are_one_line_in_the_panel(qtbot, app, tmp_path, tiny_llava_dir):
    catalog_path, image_path = make_files(tmp_path)
    catalog = app.load_data(str(catalog_path))
    app.load_data(str(image_path))  # loaded but not linked
    panel = open_panel(app, tiny_llava_dir, tmp_path / "store.sqlite")
    n_components = len(catalog.components)

    assert panel.classify() is None  # nothing selected
    assert "nothing is selected" in panel.status.text()

    panel.state.rows_from = "all"
    assert panel.classify() is None
    assert panel.status.text().startswith("no image linked to the catalog")

    panel.state.positions = "sky"  # ra/dec through the image's WCS
    panel.state.model = str(tmp_path / "no-such-model")
    outcome = run_to_end(qtbot, panel)
    assert outcome.error and "\n" not in panel.status.text()
    assert "does not exist" in panel.status.text()
    assert len(catalog.components) == n_components  # no column, not even half of one
    assert "glue_vlm" not in catalog.meta

    panel.state.model = str(tiny_llava_dir)
    panel.state.positions = "pixel"
    panel.state.x_att = catalog.id["x_mosaic"]
    panel.state.y_att = catalog.id["y_mosaic"]
    outcome = run_to_end(qtbot, panel)
    assert outcome.error is None
    assert f"0 rows classified, {N_ROWS} failed" in panel.status.text()
    assert "outside the image" in panel.status.text()
    assert np.all(np.asarray(catalog[f"{PREFIX}_code"]) == -1)
    assert len(catalog.components) == n_components + len(column_names(TASK))
    assert catalog.meta["glue_vlm"][TASK.slug]["rows_failed"] == N_ROWS
    assert no_dialogs() == []
