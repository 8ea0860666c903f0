import sqlite3

import numpy as np
import pytest

from glue_vlm.backends.base import Prediction
from glue_vlm.store import ResultStore, StoreError, run_context, stamp_key
from glue_vlm.tasks import PRESETS, Label, Task

from engines import CountingBackend

TASK = PRESETS["galaxy-morphology"]


def key_for(pixels, task=TASK, backend=None):
    return stamp_key(run_context(task, backend or CountingBackend()), pixels)


def test_key_changes_when_any_input_changes():
    pixels = np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    base = key_for(pixels)
    assert base == key_for(pixels.copy())
    changed_pixel = pixels.copy()
    changed_pixel[0, 0, 0] ^= 1
    variants = {
        "one pixel": key_for(changed_pixel),
        "shape": key_for(pixels.reshape(4, 16, 3)),
        "prompt": key_for(pixels, task=Task(TASK.slug, TASK.prompt + " Carefully.",
                                            TASK.labels)),
        "labels": key_for(pixels, task=Task(TASK.slug, TASK.prompt,
                                            TASK.labels[:3] + (Label("merger"),))),
        "model": key_for(pixels, backend=CountingBackend(model="counting-v2")),
    }
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants)


def test_batch_size_does_not_change_the_key():
    pixels = np.zeros((4, 4, 3), np.uint8)
    assert key_for(pixels, backend=CountingBackend(batch_size=1)) == \
        key_for(pixels, backend=CountingBackend(batch_size=64))


def test_round_trip_and_update(tmp_path):
    backend = CountingBackend()
    with ResultStore(tmp_path / "r.sqlite") as store:
        good = Prediction("edge_on_disk", {"smooth_round": 0.1, "smooth_cigar": 0.1,
                                           "edge_on_disk": 0.7, "unbarred_spiral": 0.1},
                          raw_text="C", method="score", prompt_tokens=12,
                          completion_tokens=1)
        bad = Prediction.failed("HTTP 400: image too small", raw_text="<html>")
        store.put_many([("k1", good), ("k2", bad)], TASK, backend)
        found = store.get_many(["k1", "k2", "k3"])
        assert found["k1"] == good and found["k1"].confidence == pytest.approx(0.7)
        assert found["k2"].error == "HTTP 400: image too small" and not found["k2"].ok
        assert "k3" not in found
        store.put_many([("k2", good)], TASK, backend)  # a retry that worked
        assert store.get_many(["k2"])["k2"] == good
        assert len(store) == 2


def test_lookup_of_many_keys_crosses_the_parameter_limit(tmp_path):
    backend = CountingBackend()
    with ResultStore(tmp_path / "r.sqlite") as store:
        items = [(f"k{i}", Prediction("a", raw_text=str(i))) for i in range(2500)]
        store.put_many(items, TASK, backend)
        found = store.get_many([f"k{i}" for i in range(0, 2600)])
        assert len(found) == 2500 and found["k2499"].raw_text == "2499"


def test_store_is_wal_and_shared_between_connections(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as first, ResultStore(path) as second:
        first.put_many([("k", Prediction("a"))], TASK, CountingBackend())
        assert second.get_many(["k"])["k"].label == "a"
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_default_path_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_VLM_STORE", str(tmp_path / "env.sqlite"))
    with ResultStore() as store:
        assert store.path == tmp_path / "env.sqlite"


def test_unusable_path_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open the result store"):
        ResultStore(blocker / "sub" / "r.sqlite")


def test_damaged_store_is_set_aside_with_a_notice_not_reused(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        store.put_many([(f"k{i}", Prediction("a", raw_text="x" * 500)) for i in range(200)],
                       TASK, CountingBackend())
        assert store.notice is None
    data = bytearray(path.read_bytes())
    for page in range(2, 12):  # scribble over b-tree page headers
        data[page * 4096: page * 4096 + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))
    with ResultStore(path) as store:
        assert store.notice and "damaged" in store.notice
        assert len(store) == 0  # a fresh store, not the damaged one
    aside = list(tmp_path.glob("r.sqlite.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bytes(data)


def test_a_file_that_is_not_a_store_is_set_aside(tmp_path):
    path = tmp_path / "r.sqlite"
    path.write_text("these are my notes, not a database" * 100)
    with ResultStore(path) as store:
        assert "damaged" in store.notice
        store.put_many([("k", Prediction("a"))], TASK, CountingBackend())
    assert list(tmp_path.glob("r.sqlite.damaged-*"))
