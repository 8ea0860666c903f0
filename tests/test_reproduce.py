"""``glue-vlm reproduce`` on small synthetic files in the study's exact formats:
DeepShadows arrays as the authors' notebook loaded them (X_data_K.npy + y_labels.npy) and
GalaxyMNIST's HDF5. Numbers are checked by hand against what the deterministic test
engine answers (engines.expected_answer); one test runs the real tiny local model."""

import re
import sqlite3

import h5py
import numpy as np
import pytest
from astropy.table import Table
from PIL import Image

from engines import expected_answer
from glue_vlm.cli import main
from glue_vlm.reproduce import STUDIES, count_check
from glue_vlm.tasks import PRESETS

ENGINE = ["--backend", "engines:CountingBackend"]
LSBG_LABELS = ["artifact", "lsbg"]
MORPH_LABELS = ["smooth_round", "smooth_cigar", "edge_on_disk", "unbarred_spiral"]


@pytest.fixture
def lsbg_dir(tmp_path):
    """Two X_data files of 12 float cutouts in 0..1 (what plt.imsave takes) + labels."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "UPenn_DS_Hangout"
    folder.mkdir()
    for k in (1, 2):
        np.save(folder / f"X_data_{k}.npy", rng.random((12, 64, 64, 3)))
    np.save(folder / "y_labels.npy", rng.integers(0, 2, 24).astype(np.float64))
    return folder


@pytest.fixture
def mnist_dir(tmp_path):
    """GalaxyMNIST's layout after download: GalaxyMNIST/raw/{train,test}_dataset.hdf5."""
    rng = np.random.default_rng(4)
    raw = tmp_path / "galaxy_mnist" / "GalaxyMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 30), ("test", 10)):
        with h5py.File(raw / f"{split}_dataset.hdf5", "w") as f:
            f.create_dataset("images", data=rng.integers(0, 256, (n, 64, 64, 3), np.uint8))
            f.create_dataset("labels", data=rng.integers(0, 4, n).astype(np.uint8))
    return tmp_path / "galaxy_mnist"


def lsbg_truth_and_pixels(folder, n):
    cube = np.concatenate([np.load(folder / f"X_data_{k}.npy") for k in (1, 2)])[:n]
    truth = [LSBG_LABELS[int(v)] for v in np.load(folder / "y_labels.npy")[:n]]
    return truth, (cube * 255).astype(np.uint8)  # as matplotlib's imsave writes floats


def mnist_truth_and_pixels(folder, n):
    with h5py.File(folder / "GalaxyMNIST" / "raw" / "train_dataset.hdf5") as f:
        return [MORPH_LABELS[int(v)] for v in f["labels"][:n]], f["images"][:n]


def hand_scores(truth, pixels, labels):
    """Accuracy and confusion (rows true, columns predicted) of the test engine."""
    answers = [expected_answer(p, labels)[0] for p in pixels]
    confusion = np.zeros((len(labels), len(labels)), int)
    for t, a in zip(truth, answers):
        confusion[labels.index(t), labels.index(a)] += 1
    return answers, np.trace(confusion) / len(truth), confusion


def section(text, mode):
    return text.split(f"== {mode} mode")[1].split("\n== ")[0]


def printed_confusion(text, labels):
    """The confusion matrix printed in one mode's section (last column: unclassified)."""
    block = text.split("confusion matrix (rows: true")[1]
    rows = []
    for label in labels:
        line = re.search(rf"^{label}\s+([\d ]+)$", block, re.M).group(1)
        rows.append([int(v) for v in line.split()])
    return np.array(rows)


def table_row(text, name):
    return re.search(rf"^{re.escape(name)}\s+(.*)$", text, re.M).group(1).split()


def store_tasks(path):
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT task, COUNT(*) FROM results GROUP BY task"))


@pytest.mark.parametrize("study", ["lsbg", "morphology"])
def test_both_modes_match_a_hand_computation(study, lsbg_dir, mnist_dir, tmp_path, capsys):
    n = 20  # the lsbg run spans both X_data files
    if study == "lsbg":
        data, labels = lsbg_dir, LSBG_LABELS
        truth, pixels = lsbg_truth_and_pixels(lsbg_dir, n)
    else:
        data, labels = mnist_dir, MORPH_LABELS
        truth, pixels = mnist_truth_and_pixels(mnist_dir, n)
    out, store = tmp_path / "out", tmp_path / "s.sqlite"
    assert main(["reproduce", study, "--data", str(data), "--n", str(n), *ENGINE,
                 "--store", str(store), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    answers, accuracy, confusion = hand_scores(truth, pixels, labels)
    for mode in ("paper", "improved"):
        row = table_row(text, f"this tool: {mode} mode")
        assert row[:3] == [str(n), f"{accuracy:.3f}", "0"]
        unclassified = np.zeros((len(labels), 1), int)
        assert (printed_confusion(section(text, mode), labels)
                == np.hstack([confusion, unclassified])).all()
        with Image.open(out / f"{study}_{mode}_confusion.png") as png:
            assert png.format == "PNG" and png.width > 200 and png.height > 150
    # each mode ran its own task through the store, one answer per image
    study_def = STUDIES[study]
    assert store_tasks(store) == {study_def.paper_task: n, study_def.improved_task: n}
    predictions = Table.read(out / f"{study}_predictions.ecsv")
    assert list(predictions["truth"]) == truth
    assert list(predictions["paper_label"]) == answers
    assert list(predictions["improved_label"]) == answers


def test_the_study_rows_carry_the_published_numbers(lsbg_dir, tmp_path, capsys):
    assert main(["reproduce", "lsbg", "--data", str(lsbg_dir), "--n", "4", *ENGINE,
                 "--modes", "improved", "--store", str(tmp_path / "s.sqlite"),
                 "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    # paper.md: accuracy 0.574, precision 0.603 and recall 0.564 for LSBG
    assert table_row(text, "study: LLaVA-NeXT") == ["500", "0.574", "0", "0.545/0.585",
                                                    "0.603/0.564"]
    assert "this tool: paper mode" not in text and "== paper mode" not in text
    morph = STUDIES["morphology"].published[0].evaluation(MORPH_LABELS)
    assert morph.accuracy == pytest.approx(0.47)
    assert [morph.support[lab] for lab in MORPH_LABELS] == [140, 119, 100, 141]


def test_a_rerun_takes_every_answer_from_the_store(lsbg_dir, tmp_path, capsys, monkeypatch):
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("GLUE_VLM_TEST_CALL_LOG", str(calls))
    args = ["reproduce", "lsbg", "--data", str(lsbg_dir), "--n", "10", *ENGINE,
            "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert len(calls.read_text().splitlines()) == 20  # 10 images x 2 modes
    assert main(args) == 0
    second = capsys.readouterr().out
    assert len(calls.read_text().splitlines()) == 20
    assert "0 answered now, 10 from the store" in second
    assert table_row(first, "this tool: paper mode") == table_row(second,
                                                                  "this tool: paper mode")


def test_over_http_the_paper_mode_sends_the_published_prompt_and_reads_free_text(
        lsbg_dir, tmp_path, capsys):
    from glue_vlm.testing.openai_server import OpenAITestServer, default_answer

    n = 8
    truth, pixels = lsbg_truth_and_pixels(lsbg_dir, n)
    with OpenAITestServer(labels=LSBG_LABELS) as server:
        assert main(["reproduce", "lsbg", "--data", str(lsbg_dir), "--n", str(n),
                     "--backend", "openai", "--model", "test-vlm", "--base-url",
                     server.base_url, "--store", str(tmp_path / "s.sqlite"),
                     "--out", str(tmp_path / "out")]) == 0
        bodies = [r.body for r in server.chat_requests()]
    text = capsys.readouterr().out
    prompt = PRESETS["paper-lsbg"].prompt
    paper = [b for b in bodies if b["messages"][0]["content"][1]["text"] == prompt]
    improved = [b for b in bodies if b not in paper]
    assert len(paper) == n and len(improved) == n
    assert not any("response_format" in b or b.get("logprobs") for b in paper)
    assert all(b["response_format"]["type"] == "json_schema" for b in improved)
    answers = []
    for p in pixels:
        probs = default_answer(p, LSBG_LABELS)
        answers.append(max(probs, key=probs.get))
    accuracy = np.mean([a == t for a, t in zip(answers, truth)])
    assert table_row(text, "this tool: paper mode")[:3] == [str(n), f"{accuracy:.3f}", "0"]
    assert table_row(text, "this tool: improved mode")[:3] == [str(n), f"{accuracy:.3f}",
                                                              "0"]
    predictions = Table.read(tmp_path / "out" / "lsbg_predictions.ecsv")
    assert list(predictions["paper_label"]) == answers
    assert np.isnan(predictions["paper_confidence"]).all()  # free text: no probabilities
    assert np.isfinite(predictions["improved_confidence"]).all()


def test_float_cutouts_in_0_255_are_read_as_jpeg_values(tmp_path, capsys):
    """DeepShadows' File_Creation notebook stored JPEG values as float64 0..255."""
    rng = np.random.default_rng(5)
    values = rng.integers(0, 256, (6, 64, 64, 3)).astype(np.float64)
    np.save(tmp_path / "X_data_1.npy", values)
    np.save(tmp_path / "y_labels.npy", np.array([0, 1, 0, 1, 1, 0], float))
    assert main(["reproduce", "lsbg", "--data", str(tmp_path / "y_labels.npy"), *ENGINE,
                 "--n", "6", "--modes", "paper", "--store", str(tmp_path / "s.sqlite"),
                 "--out", str(tmp_path / "out")]) == 0
    answers = [expected_answer(p, LSBG_LABELS)[0] for p in values.astype(np.uint8)]
    predictions = Table.read(tmp_path / "out" / "lsbg_predictions.ecsv")
    assert list(predictions["paper_label"]) == answers


def test_count_check_compares_the_first_500_with_the_studys_mix():
    lsbg = STUDIES["lsbg"]
    assert count_check(lsbg, ["artifact"] * 236 + ["lsbg"] * 264) is None
    warning = count_check(lsbg, ["artifact"] * 250 + ["lsbg"] * 250)
    assert "artifact 250, lsbg 250" in warning and "artifact 236, lsbg 264" in warning
    assert count_check(lsbg, ["artifact"] * 20) is None  # not the full 500
    for study in STUDIES.values():  # both modes' tasks share the study's label order
        assert PRESETS[study.paper_task].label_names == \
            PRESETS[study.improved_task].label_names


def _bad_lsbg(folder, case):
    if case == "no labels":
        (folder / "y_labels.npy").unlink()
    elif case == "grey cube":
        np.save(folder / "X_data_1.npy", np.zeros((12, 64, 64)))
    elif case == "not npy":
        (folder / "X_data_2.npy").write_text("not an array")
    elif case == "bad label":
        np.save(folder / "y_labels.npy", np.full(24, 2.0))
    elif case == "out of range":
        np.save(folder / "X_data_1.npy", np.full((12, 64, 64, 3), 300.0))


@pytest.mark.parametrize("case, words", [
    ("no labels", "has no y_labels.npy"),
    ("grey cube", "expected N x H x W x 3"),
    ("not npy", "cannot read"),
    ("bad label", "is not a class code"),
    ("out of range", "expected colour values"),
    ("too many", "--n 500 needs 500"),
    ("missing", "no such folder"),
    ("bad mode", "unknown mode(s) fast"),
])
def test_bad_lsbg_data_gives_one_clear_line(case, words, lsbg_dir, tmp_path, capsys):
    _bad_lsbg(lsbg_dir, case)
    data = tmp_path / "nowhere" if case == "missing" else lsbg_dir
    extra = ["--modes", "paper,fast"] if case == "bad mode" else []
    n = [] if case == "too many" else ["--n", "20"]
    assert main(["reproduce", "lsbg", "--data", str(data), *n, *ENGINE, *extra,
                 "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glue-vlm: error: ") and words in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, words", [
    ("test split", "test split"),
    ("not hdf5", "cannot read"),
    ("no images", "has no 'images'"),
    ("empty folder", "no train_dataset.hdf5"),
])
def test_bad_galaxy_mnist_data_gives_one_clear_line(case, words, mnist_dir, tmp_path,
                                                    capsys):
    raw = mnist_dir / "GalaxyMNIST" / "raw"
    data = raw / "train_dataset.hdf5"
    if case == "test split":
        data = raw / "test_dataset.hdf5"
    elif case == "not hdf5":
        data.write_bytes(b"\x89PNG not hdf5")
    elif case == "no images":
        with h5py.File(data, "w") as f:
            f.create_dataset("labels", data=np.zeros(30, np.uint8))
    elif case == "empty folder":
        data = tmp_path / "empty"
        data.mkdir()
    assert main(["reproduce", "morphology", "--data", str(data), "--n", "5", *ENGINE,
                 "--store", str(tmp_path / "s.sqlite")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glue-vlm: error: ") and words in err[0]


def test_gzipped_galaxy_mnist_reads_like_the_hdf5(mnist_dir, tmp_path, capsys):
    import gzip

    raw = mnist_dir / "GalaxyMNIST" / "raw"
    packed = tmp_path / "train_dataset.hdf5.gz"
    packed.write_bytes(gzip.compress((raw / "train_dataset.hdf5").read_bytes()))
    truth, pixels = mnist_truth_and_pixels(mnist_dir, 8)
    assert main(["reproduce", "morphology", "--data", str(packed), "--n", "8", *ENGINE,
                 "--modes", "improved", "--store", str(tmp_path / "s.sqlite"),
                 "--out", str(tmp_path / "out")]) == 0
    _, accuracy, _ = hand_scores(truth, pixels, MORPH_LABELS)
    row = table_row(capsys.readouterr().out, "this tool: improved mode")
    assert row[:2] == ["8", f"{accuracy:.3f}"]


def test_the_tiny_local_model_runs_both_modes_to_a_complete_table(tiny_llava_dir, lsbg_dir,
                                                                  tmp_path, capsys):
    n = 6
    store = tmp_path / "s.sqlite"
    assert main(["reproduce", "lsbg", "--data", str(lsbg_dir), "--n", str(n),
                 "--backend", "local", "--model", str(tiny_llava_dir), "--device", "cpu",
                 "--max-new-tokens", "8", "--store", str(store),
                 "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    for mode in ("paper", "improved"):
        row = table_row(text, f"this tool: {mode} mode")
        assert row[0] == str(n) and 0.0 <= float(row[1]) <= 1.0
        counts = printed_confusion(section(text, mode), LSBG_LABELS)
        assert counts.sum() == n  # every image once, unclassified included
        assert np.trace(counts[:, :2]) == round(float(row[1]) * n)
        assert counts[:, 2].sum() == int(row[2])
        why = re.search(r"^why rows are unclassified: (.*)$", section(text, mode), re.M)
        if int(row[2]):  # the reasons are shown, at most three, most frequent first
            shown = [int(m) for m in re.findall(r"(\d+) x ", why.group(1))]
            assert 0 < sum(shown) <= int(row[2])
        else:
            assert why is None
        assert (tmp_path / "out" / f"lsbg_{mode}_confusion.png").is_file()
    with sqlite3.connect(store) as db:
        methods = dict(db.execute("SELECT task, GROUP_CONCAT(DISTINCT method) FROM results "
                                  "GROUP BY task"))
    assert methods == {"paper-lsbg": "generate", "lsbg-vs-artifact": "score"}
