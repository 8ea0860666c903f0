"""Scores against hand-computed numbers, including the paper's published confusions."""

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from astropy.table import MaskedColumn
from PIL import Image

from glue_vlm.evaluate import UNCLASSIFIED, evaluate, plot_confusion

MORPH_LABELS = ["smooth_round", "smooth_cigar", "edge_on_disk", "unbarred_spiral"]
# Tanoglidis & Jain 2024, LLaVA-NeXT (rows true, columns predicted)
PAPER_MORPH = [[136, 2, 0, 2], [17, 57, 5, 40], [10, 31, 7, 52], [104, 2, 0, 35]]
PAPER_LSBG = {("lsbg", "lsbg"): 149, ("lsbg", "artifact"): 115,
              ("artifact", "lsbg"): 98, ("artifact", "artifact"): 138}


def rows_from_counts(counts: dict, seed=0):
    """Truth and prediction lists holding ``counts[(true, predicted)]`` rows, shuffled."""
    pairs = [pair for pair, n in counts.items() for _ in range(n)]
    np.random.default_rng(seed).shuffle(pairs)
    return [t for t, _ in pairs], [p for _, p in pairs]


def morph_counts():
    return {(MORPH_LABELS[i], MORPH_LABELS[j]): n
            for i, row in enumerate(PAPER_MORPH) for j, n in enumerate(row)}


def test_paper_lsbg_numbers():
    truth, pred = rows_from_counts(PAPER_LSBG)
    ev = evaluate(truth, pred, labels=["artifact", "lsbg"])
    # the paper: accuracy 0.574, precision 0.603 and recall 0.564 for LSBG
    assert ev.n == 500 and ev.n_unclassified == 0
    assert ev.accuracy == pytest.approx(287 / 500)
    assert round(ev.accuracy, 3) == 0.574
    assert ev.precision["lsbg"] == pytest.approx(149 / 247)
    assert round(ev.precision["lsbg"], 3) == 0.603
    assert ev.recall["lsbg"] == pytest.approx(149 / 264)
    assert round(ev.recall["lsbg"], 3) == 0.564
    assert ev.precision["artifact"] == pytest.approx(138 / 253)
    assert ev.recall["artifact"] == pytest.approx(138 / 236)
    p, r = Fraction(149, 247), Fraction(149, 264)
    assert ev.f1["lsbg"] == pytest.approx(float(2 * p * r / (p + r)))
    assert ev.support == {"artifact": 236, "lsbg": 264}
    np.testing.assert_array_equal(ev.confusion, [[138, 98, 0], [115, 149, 0]])
    assert ev.ece is None


def test_paper_morphology_numbers():
    truth, pred = rows_from_counts(morph_counts(), seed=1)
    ev = evaluate(truth, pred, labels=MORPH_LABELS)
    assert ev.accuracy == pytest.approx(235 / 500)          # the paper's 0.47
    np.testing.assert_array_equal(ev.confusion[:, :4], PAPER_MORPH)
    assert ev.confusion[:, 4].sum() == 0
    predicted_as = [267, 92, 12, 129]                          # column sums
    support = [140, 119, 100, 141]                             # row sums
    for i, lab in enumerate(MORPH_LABELS):
        assert ev.precision[lab] == pytest.approx(PAPER_MORPH[i][i] / predicted_as[i])
        assert ev.recall[lab] == pytest.approx(PAPER_MORPH[i][i] / support[i])
        assert ev.support[lab] == support[i]
    assert ev.macro("recall") == pytest.approx(
        np.mean([136 / 140, 57 / 119, 7 / 100, 35 / 141]))


def test_integer_codes_map_through_labels():
    truth, pred = rows_from_counts(PAPER_LSBG, seed=2)
    code = {"artifact": 0, "lsbg": 1}                          # the paper's coding
    by_name = evaluate(truth, pred, labels=["artifact", "lsbg"])
    by_code = evaluate(np.array([code[t] for t in truth]),
                       np.array([float(code[p]) for p in pred]),   # FITS floats
                       labels=["artifact", "lsbg"])
    np.testing.assert_array_equal(by_code.confusion, by_name.confusion)
    assert by_code.accuracy == by_name.accuracy


def test_default_label_order_is_sorted_union():
    ev = evaluate(["b", "a", "a"], ["c", "a", "b"])
    assert ev.labels == ["a", "b", "c"]
    np.testing.assert_array_equal(ev.confusion, [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert ev.support["c"] == 0 and ev.recall["c"] == 0.0
    assert ev.precision["c"] == 0.0          # predicted once, never right


def test_unclassified_rows_count_as_wrong():
    truth = ["lsbg", "lsbg", "lsbg", "artifact", "artifact", "artifact", "lsbg", "lsbg"]
    pred = ["lsbg", None, "", "artifact", UNCLASSIFIED, float("nan"), "lsbg", "artifact"]
    ev = evaluate(truth, pred, labels=["lsbg", "artifact"])
    assert ev.n == 8 and ev.n_unclassified == 4
    assert ev.accuracy == pytest.approx(3 / 8)
    np.testing.assert_array_equal(ev.confusion, [[2, 1, 2], [0, 1, 2]])
    # unclassified rows lower recall, not precision
    assert ev.recall["lsbg"] == pytest.approx(2 / 5)
    assert ev.precision["lsbg"] == pytest.approx(1.0)
    assert ev.recall["artifact"] == pytest.approx(1 / 3)
    assert ev.precision["artifact"] == pytest.approx(1 / 2)


def test_codes_minus_one_and_masked_entries_are_unclassified():
    labels = ["artifact", "lsbg"]
    by_code = evaluate([1, 1, 0, 0], [1, -1, 0, -1], labels=labels)
    column = MaskedColumn(["lsbg", "lsbg", "artifact", "lsbg"], mask=[False, True, False, True])
    by_mask = evaluate(np.array([b"lsbg", b"lsbg", b"artifact", b"artifact"]), column,
                       labels=labels)
    for ev in (by_code, by_mask):
        assert ev.n_unclassified == 2
        assert ev.accuracy == pytest.approx(0.5)
        np.testing.assert_array_equal(ev.confusion, [[1, 0, 1], [0, 1, 1]])


def test_expected_calibration_error_by_hand():
    # (true, predicted, confidence); bins are floor(10 p):
    #   bin 9: .95 right, .95 wrong, 1.0 right -> |2/3 - 0.9667| = 0.3,   weight 3/8
    #   bin 8: .85 right, .80 right            -> |1 - 0.825|    = 0.175, weight 2/8
    #   bin 6: .60 wrong                       -> |0 - 0.6|      = 0.6,   weight 1/8
    #   bin 3: .35 wrong, .30 right            -> |0.5 - 0.325|  = 0.175, weight 2/8
    # plus an unclassified row and a row without confidence, both left out
    rows = [("a", "a", 0.95), ("a", "b", 0.95), ("b", "b", 1.0), ("a", "a", 0.85),
            ("b", "b", 0.8), ("b", "a", 0.6), ("a", "b", 0.35), ("b", "b", 0.3),
            ("a", None, 0.9), ("a", "a", None)]
    truth, pred, conf = zip(*rows)
    ev = evaluate(truth, pred, labels=["a", "b"], confidence=conf)
    assert ev.n_confidence == 8
    assert ev.ece == pytest.approx(3 / 8 * 0.3 + 2 / 8 * 0.175 + 1 / 8 * 0.6 + 2 / 8 * 0.175)


def test_calibrated_confidences_give_zero_ece():
    truth = ["x"] * 10 + ["y"] * 4
    pred = ["x"] * 8 + ["y"] * 2 + ["y"] * 2 + ["x"] * 2    # 8/10 right at 0.8, 2/4 at 0.5
    conf = [0.8] * 10 + [0.5] * 4
    assert evaluate(truth, pred, confidence=conf).ece == pytest.approx(0.0)
    overconfident = evaluate(truth, pred, confidence=[0.99] * 14)
    assert overconfident.ece == pytest.approx(0.99 - 10 / 14)


@pytest.mark.parametrize("truth,pred,kwargs,message", [
    (["a", "b"], ["a"], {}, "truth has 2 rows but the predictions have 1"),
    (["a", "b"], ["a", "c"], {"labels": ["a", "b"]}, "'c', which is not one of the labels"),
    (["a", None], ["a", "b"], {}, "truth row 1 has no label"),
    ([0, 1], [1, 0], {}, "integer class codes need the list of labels"),
    ([0, 2], [1, 0], {"labels": ["a", "b"]}, "code 2, outside 0..1"),
    (["a", "b"], ["a", "b"], {"confidence": [0.5, 1.5]}, "between 0 and 1"),
    (["a", "b"], ["a", "b"], {"confidence": [0.5]}, "confidence has 1 rows"),
    ([], [], {"labels": ["a", "b"]}, "no rows"),
    (["a"], ["a"], {"labels": ["a", "a"]}, "distinct"),
    ("ab", "ab", {}, "single string"),
])
def test_bad_input_is_a_clear_error(truth, pred, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        evaluate(truth, pred, **kwargs)


def parse_confusion_block(text: str):
    """The confusion matrix as printed by ``Evaluation.format``: (columns, rows)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("confusion matrix"))
    header = lines[start + 1].split()
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        name, *counts = line.split()
        rows[name] = [int(c) for c in counts]
    return header, rows


def test_format_report_matches_the_numbers():
    truth, pred = rows_from_counts(PAPER_LSBG)
    pred[0] = None
    ev = evaluate(truth, pred, labels=["artifact", "lsbg"], confidence=[0.7] * 500)
    text = ev.format()
    assert f"accuracy  {ev.accuracy:.3f}" in text
    assert "500 rows, 1 unclassified (counted as wrong)" in text
    header, rows = parse_confusion_block(text)
    assert header == ["artifact", "lsbg", UNCLASSIFIED]
    assert rows == {lab: list(row) for lab, row in zip(ev.labels, ev.confusion.tolist())}
    table = {line.split()[0]: line.split()[1:] for line in text.splitlines()
             if line.split() and line.split()[0] in ev.labels and "." in line}
    assert float(table["lsbg"][0]) == pytest.approx(ev.precision["lsbg"], abs=5e-4)
    assert float(table["lsbg"][1]) == pytest.approx(ev.recall["lsbg"], abs=5e-4)
    assert int(table["lsbg"][3]) == 264
    assert f"{ev.ece:.3f} over 499 classified rows" in text


def test_plot_confusion_writes_a_png(tmp_path):
    truth, pred = rows_from_counts(morph_counts())
    ev = evaluate(truth, pred, labels=MORPH_LABELS)
    path = tmp_path / "confusion.png"
    plot_confusion(ev, path, title="LLaVA-NeXT, GalaxyMNIST")
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert 300 <= width <= 1500 and 200 <= height <= 1200
    assert pixels.std() > 10                  # drawn, not a blank canvas

    pred[:50] = [None] * 50                   # an unclassified column widens the figure
    wider = tmp_path / "with_unclassified.png"
    plot_confusion(evaluate(truth, pred, labels=MORPH_LABELS), str(wider))
    with Image.open(wider) as image:
        assert image.size[0] > width


def test_imports_stay_light_and_plot_leaves_pyplot_alone(tmp_path):
    code = (
        "import sys\n"
        "from glue_vlm.evaluate import evaluate, plot_confusion\n"
        "import glue_vlm.parsing\n"
        "assert 'matplotlib' not in sys.modules\n"
        f"plot_confusion(evaluate(['a', 'b'], ['a', 'a']), {str(tmp_path / 'c.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.png").stat().st_size > 1000
