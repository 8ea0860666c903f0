"""The panel's state and the glue-data adapters, without Qt: datasets and columns on
offer, rows from the selection / a subset / all, stamp sources from linked images,
pixel or sky columns, stamp cubes and path columns, tasks, engines."""

import numpy as np
import pytest
from astropy.wcs import WCS
from glue.core import Data, DataCollection
from glue.core.link_helpers import LinkSame
from glue.core.roi import RectangularROI
from glue.core.session import Session
from glue.core.subset import RoiSubsetState

from glue_vlm.backends.base import BackendError
from glue_vlm.glue.sources import (GlueInputError, cube_source, image_source, path_source,
                                   rows_of, selection_rows)
from glue_vlm.glue.state import CUSTOM, ClassifierState
from glue_vlm.stamps import ImageSource
from glue_vlm.tasks import PRESETS, TaskError


def sky_wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [30.0, -5.0]
    wcs.wcs.crpix = [40, 30]
    wcs.wcs.cdelt = [-0.3 / 3600, 0.3 / 3600]
    return wcs


@pytest.fixture
def world():
    """An image with a WCS, a catalog with pixel and sky positions, a stamp cube in
    three bands, all in one data collection with a session."""
    rng = np.random.default_rng(11)
    wcs = sky_wcs()
    pixels = rng.normal(0, 1, (60, 80)).astype(np.float32)
    image = Data(label="image", flux=pixels, coords=wcs)
    x, y = rng.uniform(5, 75, 12), rng.uniform(5, 55, 12)
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    catalog = Data(label="catalog", ra=ra, dec=dec, x=x, y=y, mag=np.arange(12.0),
                   kind=np.array(["a", "b"] * 6))
    bands = {name: rng.normal(0, 1, (12, 10, 10)) for name in ("red", "green", "blue")}
    cube = Data(label="stamps", **bands)
    collection = DataCollection([image, catalog, cube])
    session = Session(data_collection=collection)
    return dict(image=image, catalog=catalog, cube=cube, bands=bands, x=x, y=y,
                collection=collection, session=session, pixels=pixels)


def link(world):
    catalog, image = world["catalog"], world["image"]
    world["collection"].add_link(LinkSame(catalog.id["ra"], image.world_component_ids[1]))
    world["collection"].add_link(LinkSame(catalog.id["dec"], image.world_component_ids[0]))


# -- sources ---------------------------------------------------------------------------
def test_linked_pixel_and_sky_positions_cut_the_same_stamps(world):
    catalog, image = world["catalog"], world["image"]
    truth = ImageSource(world["pixels"], size=9, x=world["x"], y=world["y"])
    with pytest.raises(GlueInputError, match="no image linked to the catalog"):
        image_source(catalog, image, size=9)
    link(world)
    sources = [image_source(catalog, image, size=9),
               image_source(catalog, image, size="9", positions="pixel",
                            x=catalog.id["x"], y="y"),
               image_source(catalog, image, size=9, positions="sky", ra="ra", dec="dec")]
    for row in range(12):
        expected, _ = truth.raw(row)
        for source in sources:
            assert np.allclose(source.raw(row)[0], expected)


def test_sky_positions_need_a_wcs_and_sizes_can_be_angles(world):
    catalog = world["catalog"]
    plain = Data(label="plain", flux=world["pixels"])
    with pytest.raises(GlueInputError, match="no celestial WCS"):
        image_source(catalog, plain, positions="sky", ra="ra", dec="dec")
    source = image_source(catalog, world["image"], size="3 arcsec", positions="sky",
                          ra="ra", dec="dec")
    assert source.raw(0)[0].shape == (10, 10)  # 3" at 0.3"/px
    with pytest.raises(GlueInputError, match="cutout size"):
        image_source(catalog, world["image"], size="big", positions="pixel", x="x", y="y")


def test_colour_images_and_band_cubes_give_rgb_stamps(world):
    catalog, bands = world["catalog"], world["bands"]
    planes = {name: np.random.default_rng(i).random((60, 80))
              for i, name in enumerate(("red", "green", "blue"))}
    rgb = Data(label="colour", **planes)
    source = image_source(catalog, rgb, size=4, positions="pixel", x="x", y="y")
    stamp, _ = source.raw(3)
    assert stamp.shape == (4, 4, 3)
    truth = ImageSource(planes["green"], size=4, x=world["x"], y=world["y"])
    assert np.allclose(stamp[..., 1], truth.raw(3)[0])

    cube = cube_source(world["cube"], n_rows=12)
    stamp, _ = cube.raw(7)
    assert np.allclose(stamp[..., 0], bands["red"][7])
    assert np.allclose(stamp[..., 2], bands["blue"][7])
    green = cube_source(world["cube"], 12, attribute=world["cube"].id["green"])
    assert np.allclose(green.raw(7)[0], bands["green"][7])
    with pytest.raises(GlueInputError, match="holds 12 stamps but the catalog has 13"):
        cube_source(world["cube"], n_rows=13)
    with pytest.raises(GlueInputError, match="not a stamp cube"):
        cube_source(world["image"], n_rows=12)


def test_path_column_reads_files_relative_to_a_directory(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"s{i}.png")
    catalog = Data(label="catalog", file=np.array(["s0.png", "s1.png", "s2.png"]))
    source = path_source(catalog, "file", base_dir=tmp_path)
    assert np.array_equal(source.raw(2)[0], arrays[2])
    numbers = Data(label="numbers", file=np.arange(3.0))
    with pytest.raises(GlueInputError, match="not file paths"):
        path_source(numbers, "file")


def test_rows_from_subsets_masks_and_numbers(world):
    catalog, image = world["catalog"], world["image"]
    group = world["collection"].new_subset_group("faint", catalog.id["mag"] > 8.5)
    assert rows_of(catalog, group).tolist() == [9, 10, 11]
    assert rows_of(catalog, group.subsets[1]).tolist() == [9, 10, 11]
    assert rows_of(catalog, np.arange(12) < 2).tolist() == [0, 1]
    assert rows_of(catalog, [4, 2]).tolist() == [4, 2]
    assert rows_of(catalog, catalog.id["mag"] < 1.5).tolist() == [0, 1]
    with pytest.raises(GlueInputError, match="belongs to 'image'"):
        rows_of(catalog, group.subsets[0])
    with pytest.raises(GlueInputError, match="no rows selected"):
        rows_of(catalog, catalog.id["mag"] > 100)
    with pytest.raises(GlueInputError, match="row numbers"):
        rows_of(catalog, [12])
    with pytest.raises(GlueInputError, match="nothing is selected"):
        selection_rows([], catalog)
    assert selection_rows([group], catalog).tolist() == [9, 10, 11]


# -- state ------------------------------------------------------------------------------
def test_dataset_and_column_choices_follow_the_collection(world):
    state = ClassifierState(world["collection"], world["session"])
    choices = lambda name: getattr(type(state), name).get_choices(state)  # noqa: E731
    assert choices("catalog") == [world["catalog"]]
    assert choices("image") == [world["image"]] and choices("cube") == [world["cube"]]
    assert state.x_att.label == "x" and state.ra_att.label == "ra"
    assert [c.label for c in choices("path_att")] == ["kind"]
    assert state.cube_att is None  # the bands together, as colour
    other = Data(label="other", z=np.arange(5.0))
    world["collection"].append(other)
    assert choices("catalog") == [world["catalog"], other]
    state.catalog = other
    assert state.x_att is None or state.x_att.label == "z"
    world["catalog"].add_component(np.ones(12), "extra")
    state.catalog = world["catalog"]
    assert "extra" in [c.label for c in choices("x_att")]


def test_rows_follow_the_selection_and_subsets(world):
    catalog = world["catalog"]
    state = ClassifierState(world["collection"], world["session"])
    assert state.rows_from == "selection" and state.n_rows == 0
    assert "nothing is selected" in state.rows_note
    mode = world["session"].edit_subset_mode
    group = world["collection"].new_subset_group(
        "box", RoiSubsetState(catalog.id["mag"], catalog.id["x"],
                              RectangularROI(-1, 3.5, -100, 100)))
    mode.edit_subset = [group]
    assert state.n_rows == 4 and state.rows().tolist() == [0, 1, 2, 3]
    group.subset_state = RoiSubsetState(catalog.id["mag"], catalog.id["x"],
                                        RectangularROI(5.5, 7.5, -100, 100))
    assert state.n_rows == 2 and state.rows().tolist() == [6, 7]
    state.rows_from = "subset"
    assert state.subset is group.subsets[1] and state.n_rows == 2
    state.rows_from = "all"
    assert state.n_rows == 12


def test_presets_custom_tasks_and_toml(world, tmp_path):
    state = ClassifierState(world["collection"], world["session"])
    state.task_preset = "galaxy-morphology"
    assert state.task() is PRESETS["galaxy-morphology"]
    assert state.task_labels.splitlines()[0].startswith("smooth_round: smooth")
    state.task_labels = "spiral: arms\nelliptical\nirregular: neither"
    assert state.task_preset == CUSTOM
    task = state.task()
    assert task.label_names == ["spiral", "elliptical", "irregular"]
    assert task.labels[0].description == "arms" and task.slug == "galaxy-morphology"
    state.task_slug = "my-shapes"
    state.save_task_file(tmp_path / "shapes.toml")
    state.task_preset = "paper-lsbg"
    assert state.task().option_style == "number"
    loaded = state.load_task_file(tmp_path / "shapes.toml")
    assert state.task_preset == CUSTOM and state.task() == loaded
    assert loaded.label_names == ["spiral", "elliptical", "irregular"]
    state.task_labels = "only_one"
    with pytest.raises(TaskError, match="at least two labels"):
        state.task()


def test_engine_choices(world, monkeypatch, tmp_path):
    state = ClassifierState(world["collection"], world["session"])
    assert state.engine_choice() == ("openai", {"model": "gpt-4o", "api_key": None,
                                                "detail": "low"})
    state.engine_kind = "openai-compatible"
    with pytest.raises(BackendError, match="server's URL"):
        state.engine_choice()
    state.base_url, state.model, state.api_key = "http://localhost:9/v1", "tiny", " k "
    assert state.engine_choice()[1] == {"model": "tiny", "base_url": "http://localhost:9/v1",
                                        "api_key": "k", "detail": "low"}
    state.engine_kind = "local"
    assert state.model == "llava-hf/llava-v1.6-mistral-7b-hf"
    state.engine_kind = "openai-compatible"
    assert state.model == "tiny"  # each engine kind remembers its model
    state.engine_kind = "plugin"
    with pytest.raises(BackendError, match="package.module:Class"):
        state.engine_choice()
    state.engine_spec = "engines:CountingBackend"
    assert state.create_engine().name == "counting"
    monkeypatch.setenv("GLUE_VLM_STORE", str(tmp_path / "env.sqlite"))
    assert state.store_location() == tmp_path / "env.sqlite"
    state.store_path = str(tmp_path / "mine.sqlite")
    assert state.store_location() == tmp_path / "mine.sqlite"


def test_preview_shows_stamps_as_the_engine_gets_them(world):
    link(world)
    state = ClassifierState(world["collection"], world["session"])
    state.rows_from = "all"
    state.size = "40"
    state.engine_kind = "plugin"
    state.engine_spec = "engines:CountingBackend"
    stamps = state.preview()
    assert [s.row for s in stamps] == list(range(8))
    assert all(s.pixels.shape == (40, 40, 3) and s.pixels.dtype == np.uint8 for s in stamps)
    state.engine_kind = "local"  # shrinks to at most 336 px
    state.size = "400"
    assert state.preview(2)[0].pixels.shape == (336, 336, 3)


def test_state_columns_and_scripting_are_qt_free_and_the_plugin_is_defensive():
    import subprocess
    import sys

    code = ("import sys\n"
            "import glue_vlm.glue.state, glue_vlm.glue.columns, glue_vlm.glue.scripting\n"
            "import glue_vlm.glue.plugin\n"
            "print(sorted(m for m in ('PySide6', 'PyQt5', 'PyQt6', 'qtpy') "
            "if m in sys.modules))\n"
            "sys.modules['glue_qt'] = None  # glue installed without Qt\n"
            "sys.modules['glue_qt.config'] = None\n"
            "glue_vlm.glue.plugin.setup()\n"
            "print('registered nothing')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:2] == ["[]", "registered nothing"]
