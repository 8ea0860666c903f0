"""The command line end to end (engine: the deterministic test engine in engines.py;
the real engines have their own CLI tests)."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from glue_vlm.cli import main
from glue_vlm.tasks import PRESETS

ENGINE = ["--backend", "engines:CountingBackend"]


@pytest.fixture
def catalog(tmp_path):
    n = 12
    rng = np.random.default_rng(0)
    cube = rng.normal(10, 2, (n, 20, 20)).astype(np.float32)
    np.save(tmp_path / "cube.npy", cube)
    table = Table({"id": np.arange(n), "x": rng.uniform(20, 80, n),
                   "y": rng.uniform(20, 80, n), "pick": np.arange(n) % 3 == 0})
    table.write(tmp_path / "cat.ecsv")
    fits.PrimaryHDU(rng.normal(0, 1, (100, 100)).astype(np.float32)).writeto(
        tmp_path / "nowcs.fits")
    return tmp_path


def run(catalog, *extra, store=True):
    args = ["classify", str(catalog / "cat.ecsv"), "--task", "galaxy-morphology",
            "-o", str(catalog / "out.ecsv"), *ENGINE, *extra]
    if store:
        args += ["--store", str(catalog / "s.sqlite")]
    return main(args)


def test_classify_writes_the_column_contract(catalog, capsys):
    assert run(catalog, "--stamps", str(catalog / "cube.npy"), "--select-col", "pick") == 0
    out = Table.read(catalog / "out.ecsv")
    pick = np.asarray(out["pick"])
    codes = np.asarray(out["galaxy_morphology_code"])
    assert (codes[pick] >= 0).all() and (codes[~pick] == -1).all()
    labels = np.asarray(out["galaxy_morphology_label"])
    names = PRESETS["galaxy-morphology"].label_names
    assert [names[c] for c in codes[pick]] == list(labels[pick])
    assert set(labels[~pick]) == {"unclassified"}
    probs = np.stack([np.asarray(out[f"galaxy_morphology_p_{n}"]) for n in names], axis=1)
    assert np.allclose(probs[pick].sum(axis=1), 1, atol=1e-5)
    assert np.isnan(probs[~pick]).all()
    conf = np.asarray(out["galaxy_morphology_confidence"])
    assert np.allclose(conf[pick], probs[pick].max(axis=1), atol=1e-6)
    meta = out.meta["glue_vlm"]
    assert meta["task"] == "galaxy-morphology" and meta["labels"] == names
    assert meta["rows_classified"] == int(pick.sum()) and meta["complete"]
    assert "wrote" in capsys.readouterr().err


def test_rerun_on_more_rows_updates_in_place_and_reuses_answers(catalog):
    assert run(catalog, "--stamps", str(catalog / "cube.npy"), "--rows", "0:4") == 0
    first = Table.read(catalog / "out.ecsv")
    (catalog / "out.ecsv").rename(catalog / "cat.ecsv")
    assert run(catalog, "--stamps", str(catalog / "cube.npy"), "--rows", "2:8") == 0
    second = Table.read(catalog / "out.ecsv")
    codes = np.asarray(second["galaxy_morphology_code"])
    assert list(codes[:4]) == list(first["galaxy_morphology_code"][:4])
    assert (codes[:8] >= 0).all() and (codes[8:] == -1).all()
    assert second.colnames.count("galaxy_morphology_code") == 1


def test_image_with_pixel_positions(catalog):
    assert run(catalog, "--image", str(catalog / "nowcs.fits"), "--x-col", "x",
               "--y-col", "y", "--size", "16") == 0
    assert (np.asarray(Table.read(catalog / "out.ecsv")["galaxy_morphology_code"]) >= 0).all()


def test_evaluate_prints_accuracy_and_draws_the_matrix(tmp_path, capsys):
    table = Table({"t_label": ["a", "a", "b", "b"], "truth": ["a", "b", "b", "b"]})
    table.write(tmp_path / "t.ecsv")
    assert main(["evaluate", str(tmp_path / "t.ecsv"), "--pred-col", "t_label",
                 "--truth-col", "truth", "--plot", str(tmp_path / "cm.png")]) == 0
    assert "0.75" in capsys.readouterr().out
    assert (tmp_path / "cm.png").stat().st_size > 1000


def bad_cube(catalog):
    np.save(catalog / "short.npy", np.zeros((5, 8, 8), np.float32))
    return ["--stamps", str(catalog / "short.npy")]


def image_of(ndim):
    def make(catalog):
        shape = {1: (100,), 4: (2, 3, 20, 20)}[ndim]
        fits.PrimaryHDU(np.zeros(shape, np.float32)).writeto(catalog / f"im{ndim}.fits")
        return ["--image", str(catalog / f"im{ndim}.fits"), "--x-col", "x", "--y-col", "y"]
    return make


def toml_file(catalog):
    (catalog / "bad.toml").write_text('slug = "x"\nlabels = [\n')
    return ["--stamps", str(catalog / "cube.npy"), "--task", str(catalog / "bad.toml")]


@pytest.mark.parametrize("make_args, message", [
    (lambda c: ["--path-col", "file"], "column(s) file not in the table"),
    (lambda c: ["--image", str(c / "nowcs.fits"), "--x-col", "xx", "--y-col", "y"],
     "column(s) xx not in the table"),
    (bad_cube, "5"),
    (image_of(1), "1-D"),
    (image_of(4), "4-D"),
    (lambda c: ["--image", str(c / "nowcs.fits"), "--ra-col", "x", "--dec-col", "y"],
     "WCS"),
    (lambda c: ["--stamps", str(c / "cube.npy"), "--rows", "5:5"], "empty"),
    (lambda c: ["--stamps", str(c / "cube.npy"), "--task", "nope"], "unknown task 'nope'"),
    (toml_file, "not valid TOML"),
    (lambda c: ["--stamps", str(c / "cube.npy"), "-o", str(c / "no" / "dir" / "o.ecsv")],
     "cannot write output"),
    (lambda c: [], "exactly one stamp source"),
    (lambda c: ["--stamps", str(c / "cube.npy"), "--backend", "nope"], "unknown backend"),
])
def test_bad_input_gives_one_clear_line_and_writes_nothing(catalog, capsys, make_args,
                                                           message):
    args = make_args(catalog)
    code = run(catalog, *args)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("glue-vlm: error:") and "\n" not in err
    assert message in err
    assert not (catalog / "out.ecsv").exists()
    assert not list(catalog.glob(".*partial*"))


def test_summary_reports_engine_calls_and_token_usage(catalog, capsys):
    assert run(catalog, "--stamps", str(catalog / "cube.npy"), "--rows", "0:5") == 0
    assert "5 rows asked, 0 from the store; tokens used: 50 input + 5 output" in \
        capsys.readouterr().err
    (catalog / "out.ecsv").unlink()
    assert run(catalog, "--stamps", str(catalog / "cube.npy"), "--rows", "0:5") == 0
    assert "0 rows asked, 5 from the store; tokens used: 0 input + 0 output" in \
        capsys.readouterr().err
