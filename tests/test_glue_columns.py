"""Writing results into glue Data: the column contract, in-place updates, glue's
categorical and subset-cache pitfalls, review, provenance, and the scripting call."""

import threading

import numpy as np
import pytest
from glue.core import Data, DataCollection
from glue.core.hub import HubListener
from glue.core.message import NumericalDataChangedMessage

from glue_vlm.backends.base import BackendError, Prediction
from glue_vlm.columns import column_names
from glue_vlm.glue.columns import (class_counts, component_id, reached_positions,
                                   review_column, write_result, write_review, write_run)
from glue_vlm.glue.scripting import classify_data, cube_source
from glue_vlm.run import RunResult, stamp_settings_for
from glue_vlm.stamps import CubeSource, iter_stamps
from glue_vlm.store import ResultStore
from glue_vlm.tasks import PRESETS, Label, Task

from engines import CountingBackend, expected_answer

TASK = PRESETS["star-galaxy-artifact"]
P = TASK.column_prefix


def result_for(task, rows, labels):
    """A RunResult with ``labels[i]`` (None = failed) for ``rows[i]``."""
    result = RunResult.empty(task, rows)
    for position, label in enumerate(labels):
        if label is None:
            result.record(position, Prediction.failed("server said no"))
        else:
            probs = {name: (0.7 if name == label else 0.3 / (len(task.labels) - 1))
                     for name in task.label_names}
            result.record(position, Prediction(label=label, probabilities=probs))
    return result


@pytest.fixture
def catalog():
    data = Data(label="catalog", mag=np.linspace(18, 24, 10))
    DataCollection([data])  # gives it a hub
    return data


class Listener(HubListener):
    def __init__(self, hub):
        self.messages = []
        hub.subscribe(self, NumericalDataChangedMessage, handler=self.messages.append)


def test_first_write_creates_the_contract_columns(catalog):
    write_result(catalog, result_for(TASK, [2, 5, 7], ["star", None, "artifact"]))
    assert [cid.label for cid in catalog.main_components][1:] == column_names(TASK)
    label = catalog.get_component(component_id(catalog, f"{P}_label"))
    assert label.categorical
    assert list(label.categories) == ["star", "galaxy", "artifact", "unclassified"]
    expected = ["unclassified"] * 10
    expected[2], expected[7] = "star", "artifact"
    assert list(label.labels) == expected
    codes = np.asarray(catalog[f"{P}_code"])
    assert codes.dtype.kind == "i" and codes.tolist() == [-1, -1, 0, -1, -1, -1, -1, 2, -1, -1]
    confidence = np.asarray(catalog[f"{P}_confidence"])
    assert np.isclose(confidence[2], 0.7) and np.isnan(np.delete(confidence, [2, 7])).all()
    assert np.isclose(catalog[f"{P}_p_galaxy"][7], 0.15)


def test_rewrite_updates_the_same_components_and_tells_glue(catalog):
    first = write_result(catalog, result_for(TASK, [0, 1], ["star", "galaxy"]))
    subset = catalog.new_subset(catalog.id[first[f"{P}_code"]] == 1)
    assert np.flatnonzero(subset.to_mask()).tolist() == [1]
    listener = Listener(catalog.hub)

    second = write_result(catalog, result_for(TASK, [1, 4], ["artifact", "galaxy"]))
    assert all(second[name] is cid for name, cid in first.items())
    assert len(catalog.main_components) == 1 + len(column_names(TASK))
    assert np.asarray(catalog[f"{P}_label"])[[0, 1, 4]].tolist() == ["star", "artifact", "galaxy"]
    assert np.flatnonzero(subset.to_mask()).tolist() == [4]  # mask cache was cleared
    assert len(listener.messages) == 1
    assert set(listener.messages[0].components_changed) == set(first.values())


def test_a_task_with_other_labels_starts_afresh(catalog):
    write_result(catalog, result_for(TASK, [0, 1], ["star", "galaxy"]))
    other = Task(slug=TASK.slug, prompt="Point source or not?",
                 labels=(Label("star"), Label("extended")))
    write_result(catalog, result_for(other, [3], ["extended"]))
    names = [cid.label for cid in catalog.main_components]
    assert f"{P}_p_extended" in names and f"{P}_p_galaxy" not in names
    assert f"{P}_p_artifact" not in names and len(names) == 1 + len(column_names(other))
    assert np.asarray(catalog[f"{P}_code"]).tolist() == [-1, -1, -1, 1] + [-1] * 6


def test_write_run_keeps_rows_a_cancelled_run_never_reached(catalog, tmp_path):
    write_result(catalog, result_for(TASK, [0, 1, 2, 3], ["star"] * 4))
    cancelled = result_for(TASK, [2, 3, 4, 5], ["galaxy", None])  # 4, 5 never reached
    cancelled.cancelled = True
    assert reached_positions(cancelled).tolist() == [0, 1]
    with ResultStore(tmp_path / "s.sqlite") as store:
        write_run(catalog, cancelled, CountingBackend(), store)
    assert np.asarray(catalog[f"{P}_code"])[:6].tolist() == [0, 0, 1, -1, -1, -1]
    meta = catalog.meta["glue_vlm"][TASK.slug]
    assert meta["complete"] is False and meta["rows_classified"] == 1
    assert meta["rows_failed"] == 1 and meta["store"] == str(tmp_path / "s.sqlite")


def test_columns_are_written_on_the_main_thread_only(catalog):
    caught = []

    def write():
        try:
            write_result(catalog, result_for(TASK, [0], ["star"]))
        except RuntimeError as exc:
            caught.append(str(exc))

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert caught and "main thread" in caught[0]
    assert component_id(catalog, f"{P}_label") is None


def test_review_goes_to_its_own_column(catalog):
    write_result(catalog, result_for(TASK, [0, 1, 2], ["star", "star", "galaxy"]))
    model_labels = np.asarray(catalog[f"{P}_label"]).copy()
    write_review(catalog, TASK, [1, 2], "artifact")
    write_review(catalog, TASK, [2, 6], "galaxy")
    human = np.asarray(catalog[review_column(TASK)])
    assert human.tolist() == ["unreviewed", "artifact", "galaxy", "unreviewed",
                              "unreviewed", "unreviewed", "galaxy"] + ["unreviewed"] * 3
    assert np.array_equal(np.asarray(catalog[f"{P}_label"]), model_labels)
    with pytest.raises(ValueError, match="not a label"):
        write_review(catalog, TASK, [0], "planet")


def test_class_counts(catalog):
    assert class_counts(catalog, TASK)["unclassified"] == 10
    write_result(catalog, result_for(TASK, [0, 1, 2, 3], ["star", "star", None, "artifact"]))
    assert class_counts(catalog, TASK) == {"star": 2, "galaxy": 0, "artifact": 1,
                                           "unclassified": 7}


# -- scripting (orchestration: a deterministic engine) -------------------------------------
def stamp_cube(n, seed=3):
    return np.random.default_rng(seed).normal(100, 10, (n, 12, 12)).astype(np.float32)


def test_classify_data_writes_the_subset_rows(tmp_path):
    cube = stamp_cube(10)
    catalog = Data(label="catalog", mag=np.arange(10.0))
    stamps = Data(label="stamps", cube=cube)
    DataCollection([catalog, stamps])
    subset = catalog.new_subset(catalog.id["mag"] > 5.5)
    engine = CountingBackend(batch_size=3)
    source = cube_source(stamps, n_rows=10)
    result = classify_data(catalog, source, TASK.slug, engine, rows=subset,
                           store=tmp_path / "s.sqlite")
    rows = [6, 7, 8, 9]
    assert result.rows.tolist() == rows and sorted(engine.calls) == rows
    settings = stamp_settings_for(engine)
    expected = [expected_answer(st.pixels, TASK.label_names)[0]
                for st in iter_stamps(CubeSource(cube), rows, settings)]
    labels = np.asarray(catalog[f"{P}_label"])
    assert labels[rows].tolist() == expected and set(labels[:6]) == {"unclassified"}
    assert catalog.meta["glue_vlm"][TASK.slug]["backend"] == "counting"

    again = CountingBackend()
    classify_data(catalog, source, TASK, again, rows=np.arange(10) >= 6,
                  store=tmp_path / "s.sqlite")
    assert again.calls == []  # all answered from the store


def test_classify_data_writes_nothing_when_the_engine_fails(tmp_path):
    catalog = Data(label="catalog", mag=np.arange(8.0))
    stamps = Data(label="stamps", cube=stamp_cube(8))
    DataCollection([catalog, stamps])
    engine = CountingBackend(batch_size=2, fatal_after=4)
    with pytest.raises(BackendError, match="credentials"):
        classify_data(catalog, cube_source(stamps, 8), TASK, engine,
                      store=tmp_path / "s.sqlite")
    assert component_id(catalog, f"{P}_label") is None and "glue_vlm" not in catalog.meta
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert len(store) == 4  # what was answered is kept for the rerun
