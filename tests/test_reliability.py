"""Reliability: shared stores, full and read-only disks, arbitrary task files."""

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glue_vlm.backends.base import Prediction
from glue_vlm.run import classify
from glue_vlm.stamps import CubeSource
from glue_vlm.store import ResultStore, StoreError
from glue_vlm.tasks import Task, TaskError, load_task, save_task

from engines import CountingBackend

TESTS = Path(__file__).parent
TASK_NAME = "star-galaxy-artifact"


# -- two runs on one store at once -------------------------------------------------------
def test_two_processes_share_one_store(tmp_path):
    n = 80
    cube = np.random.default_rng(5).normal(0, 1, (n, 12, 12)).astype(np.float32)
    np.save(tmp_path / "cube.npy", cube)
    Table({"id": np.arange(n)}).write(tmp_path / "cat.ecsv")
    env = dict(os.environ, PYTHONPATH=str(TESTS), GLUE_VLM_TEST_DELAY="0.01")

    def start(rows, out):
        return subprocess.Popen(
            [sys.executable, "-m", "glue_vlm.cli", "classify", str(tmp_path / "cat.ecsv"),
             "--task", TASK_NAME, "--stamps", str(tmp_path / "cube.npy"),
             "--backend", "engines:CountingBackend", "--batch-size", "2",
             "--store", str(tmp_path / "shared.sqlite"), "--rows", rows,
             "-o", str(tmp_path / out)], env=env, stderr=subprocess.PIPE, text=True)

    first, second = start("0:60", "a.ecsv"), start("20:80", "b.ecsv")
    errors = [p.communicate(timeout=180)[1] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, errors
    with ResultStore(tmp_path / "shared.sqlite") as store:
        assert len(store) == n
    a, b = Table.read(tmp_path / "a.ecsv"), Table.read(tmp_path / "b.ecsv")
    code = "star_galaxy_artifact_code"
    assert np.array_equal(a[code][20:60], b[code][20:60])  # same answers where both ran
    assert (a[code][:60] >= 0).all() and (b[code][20:] >= 0).all()


def _open_and_write(path, go, answers, k):
    go.wait()
    try:
        with ResultStore(path) as store:
            for i in range(5):
                store.put_many([(f"{k}-{i}", Prediction("a"))],
                               Task("t", "Which?", ("a", "b")), CountingBackend())
        answers.put("ok")
    except StoreError as exc:
        answers.put(str(exc))


def test_processes_opening_a_new_store_at_once_all_get_in(tmp_path):
    """A new file's switch to WAL reports "locked" at once to the others (seen in CI)."""
    import multiprocessing

    outcomes = []
    for attempt in range(8):
        path = tmp_path / f"s{attempt}.sqlite"
        answers, go = multiprocessing.Queue(), multiprocessing.Event()
        procs = [multiprocessing.Process(target=_open_and_write, args=(path, go, answers, k))
                 for k in range(5)]
        for proc in procs:
            proc.start()
        go.set()
        for proc in procs:
            proc.join(60)
        outcomes += [answers.get(timeout=5) for _ in procs]
        with ResultStore(path) as store:
            assert len(store) == 25
    assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:2]


# -- disks that refuse writes ------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs (needs root, as in CI); skipped where mounting is refused."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_gives_a_clear_error_and_keeps_what_was_stored(small_disk):
    path = small_disk / "r.sqlite"
    task = Task("t", "Which?", ("a", "b"))
    backend = CountingBackend()
    kept = 0
    with ResultStore(path) as store:
        with pytest.raises(StoreError, match="cannot write to the result store.*free the"):
            for batch in range(10_000):
                store.put_many([(f"k{batch}-{i}", Prediction("a", raw_text="x" * 2000))
                                for i in range(5)], task, backend)
                kept += 5
    assert kept > 0
    with ResultStore(path) as store:  # everything committed before the error is there
        assert len(store) == kept
        assert store.get_many([f"k0-{i}" for i in range(5)])["k0-4"].label == "a"


def test_read_only_disk_gives_a_clear_error_and_leaves_the_store_intact(small_disk):
    path = small_disk / "r.sqlite"
    with ResultStore(path) as store:
        store.put_many([("k", Prediction("a"))], Task("t", "Which?", ("a", "b")),
                       CountingBackend())
    before = path.read_bytes()
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0
    with pytest.raises(StoreError, match="cannot open the result store"):
        ResultStore(path)
    assert path.read_bytes() == before


def test_run_stops_with_the_store_error_and_keeps_earlier_batches(small_disk):
    n = 400
    cube = np.random.default_rng(2).normal(0, 1, (n, 40, 40)).astype(np.float32)
    task = Task("t", "Which?", ("a", "b"))

    class Wordy(CountingBackend):  # big answers fill the small disk quickly
        def predict(self, stamps, task):
            out = super().predict(stamps, task)
            for p in out:
                p.raw_text = "y" * 3000
            return out

    delivered = []
    with ResultStore(small_disk / "r.sqlite") as store:
        with pytest.raises(StoreError):
            classify(CubeSource(cube), range(n), task, Wordy(batch_size=8), store=store,
                     on_batch=lambda pos, preds: delivered.extend(pos.tolist()))
    with ResultStore(small_disk / "r.sqlite") as store:
        assert len(store) == len(delivered) > 0  # reported == stored, nothing else


# -- task files: whatever the text, one clear error or a valid task -----------------------
toml_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=toml_text)
def test_any_task_file_loads_or_fails_with_one_line(tmp_path, text):
    path = tmp_path / "t.toml"
    path.write_text(text, encoding="utf-8")
    try:
        task = load_task(path)
    except TaskError as exc:
        assert str(path) in str(exc) or "task" in str(exc)
    else:
        assert len(task.labels) >= 2


label_names = st.text(st.characters(whitelist_categories=("L", "N", "Zs", "Pd")),
                      min_size=1, max_size=20).filter(lambda s: s.strip())


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(label_names, min_size=2, max_size=6),
       prompt=st.text(min_size=1, max_size=200).filter(lambda s: s.strip()),
       descriptions=st.lists(st.text(max_size=40), min_size=6, max_size=6))
def test_valid_tasks_survive_a_toml_round_trip(tmp_path, names, prompt, descriptions):
    try:
        task = Task("custom", prompt, tuple((n, d) for n, d in zip(names, descriptions)))
    except TaskError:
        return  # e.g. two names with the same column name: rejected up front
    path = tmp_path / "t.toml"
    save_task(task, path)
    assert load_task(path) == task
