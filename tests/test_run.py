"""Orchestration: store lookups, batching, failures, cancel, resume after kill -9."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from glue_vlm.backends.base import BackendError
from glue_vlm.run import classify, stamp_settings_for
from glue_vlm.stamps import CubeSource, StampSettings, iter_stamps
from glue_vlm.store import ResultStore
from glue_vlm.tasks import PRESETS

from engines import CountingBackend, expected_answer

TASK = PRESETS["galaxy-morphology"]
TESTS = Path(__file__).parent


def make_cube(n, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return rng.normal(100, 10, (n, size, size)).astype(np.float32)


def expected_codes(cube, rows, backend):
    settings = stamp_settings_for(backend, StampSettings())
    codes = []
    for stamp in iter_stamps(CubeSource(cube), rows, settings):
        label, _ = expected_answer(stamp.pixels, TASK.label_names)
        codes.append(TASK.label_names.index(label))
    return np.array(codes)


def test_classifies_selected_rows_in_row_order(tmp_path):
    cube = make_cube(30)
    rows = np.array([29, 3, 4, 17, 0, 8, 9])
    backend = CountingBackend(batch_size=3)
    with ResultStore(tmp_path / "s.sqlite") as store:
        result = classify(CubeSource(cube), rows, TASK, backend, store=store)
    assert list(result.rows) == list(rows)
    assert np.array_equal(result.codes, expected_codes(cube, rows, backend))
    assert sorted(backend.calls) == sorted(rows.tolist())
    assert np.allclose(np.nansum(result.probabilities, axis=1), 1.0)
    picked = result.probabilities[np.arange(len(rows)), result.codes]
    assert np.allclose(result.confidence, picked)
    assert result.errors == {} and not result.cancelled
    assert result.usage.prompt_tokens == 10 * len(rows)
    assert result.usage.calls == 3  # 7 rows in batches of 3


def test_rerun_is_answered_from_the_store(tmp_path):
    cube = make_cube(12)
    rows = np.arange(12)
    with ResultStore(tmp_path / "s.sqlite") as store:
        first = classify(CubeSource(cube), rows, TASK, CountingBackend(), store=store)
        again = CountingBackend()
        seen = []
        second = classify(CubeSource(cube), rows, TASK, again, store=store,
                          progress=lambda p: seen.append((p.done, p.cached)))
    assert again.calls == []
    assert np.array_equal(first.codes, second.codes)
    assert np.allclose(first.probabilities, second.probabilities)
    assert seen[-1] == (12, 12)
    assert second.usage.calls == 0 and second.usage.prompt_tokens == 0


def test_a_different_model_is_not_answered_from_the_store(tmp_path):
    cube = make_cube(5)
    with ResultStore(tmp_path / "s.sqlite") as store:
        classify(CubeSource(cube), range(5), TASK, CountingBackend(), store=store)
        other = CountingBackend(model="counting-v2")
        classify(CubeSource(cube), range(5), TASK, other, store=store)
    assert sorted(other.calls) == list(range(5))


def test_failed_rows_do_not_stop_the_run_and_only_they_are_retried(tmp_path):
    cube = make_cube(10)
    with ResultStore(tmp_path / "s.sqlite") as store:
        flaky = CountingBackend(fail_rows=(2, 7))
        first = classify(CubeSource(cube), range(10), TASK, flaky, store=store)
        assert set(first.errors) == {2, 7}
        assert "rejected by the server" in first.errors[2]
        assert first.codes[2] == first.codes[7] == -1
        assert np.isnan(first.confidence[2])
        assert (np.delete(first.codes, [2, 7]) >= 0).all()
        assert first.progress.failed == 2 and first.progress.done == 10

        healed = CountingBackend()
        second = classify(CubeSource(cube), range(10), TASK, healed, store=store)
    assert sorted(healed.calls) == [2, 7]
    assert second.errors == {}
    assert np.array_equal(second.codes, expected_codes(cube, range(10), healed))


def test_cancel_stops_after_the_current_batch_and_keeps_finished_rows(tmp_path):
    cube = make_cube(20)
    cancel = threading.Event()
    delivered = []

    def on_batch(positions, predictions):
        delivered.extend(positions.tolist())
        cancel.set()  # user presses Cancel while the first batch is reported

    backend = CountingBackend(batch_size=4)
    with ResultStore(tmp_path / "s.sqlite") as store:
        result = classify(CubeSource(cube), range(20), TASK, backend, store=store,
                          on_batch=on_batch, cancel=cancel)
        assert result.cancelled
        assert delivered == [0, 1, 2, 3] and backend.calls == [0, 1, 2, 3]
        assert (result.codes[:4] >= 0).all() and (result.codes[4:] == -1).all()

        rest = CountingBackend(batch_size=4)
        final = classify(CubeSource(cube), range(20), TASK, rest, store=store)
    assert sorted(rest.calls) == list(range(4, 20))
    assert not final.cancelled and (final.codes >= 0).all()


def test_fatal_engine_error_stops_the_run_but_keeps_what_was_answered(tmp_path):
    cube = make_cube(12)
    with ResultStore(tmp_path / "s.sqlite") as store:
        broken = CountingBackend(batch_size=4, fatal_after=8)
        with pytest.raises(BackendError, match="credentials"):
            classify(CubeSource(cube), range(12), TASK, broken, store=store)
        assert len(store) == 8
        fixed = CountingBackend(batch_size=4)
        classify(CubeSource(cube), range(12), TASK, fixed, store=store)
    assert sorted(fixed.calls) == list(range(8, 12))


def test_rows_without_a_stamp_fail_with_their_reason_and_cost_nothing(tmp_path):
    from glue_vlm.stamps import PathSource

    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(tmp_path / "good.png")
    source = PathSource([str(tmp_path / "good.png"), str(tmp_path / "missing.png")])
    backend = CountingBackend()
    result = classify(source, [0, 1], TASK, backend, store=None)
    assert backend.calls == [0]
    assert result.codes[0] >= 0 and result.codes[1] == -1
    assert "missing.png" in result.errors[1]


# -- kill -9 in the middle of a CLI run, then resume ---------------------------------------
def cli(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "glue_vlm.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def counted_cli_run(tmp_path, n, seed, delay):
    """A catalog of ``n`` rows with its cube, and the CLI command and environment that
    classify it with the counting test engine logging each answered row."""
    cube = make_cube(n, seed=seed)
    np.save(tmp_path / "cube.npy", cube)
    Table({"id": np.arange(n)}).write(tmp_path / "cat.ecsv")
    log = tmp_path / "calls.log"
    env = dict(os.environ, PYTHONPATH=str(TESTS), GLUE_VLM_TEST_CALL_LOG=str(log),
               GLUE_VLM_TEST_DELAY=str(delay))
    args = ["classify", str(tmp_path / "cat.ecsv"), "--task", TASK.slug,
            "--stamps", str(tmp_path / "cube.npy"), "--backend", "engines:CountingBackend",
            "--store", str(tmp_path / "s.sqlite"), "-o", str(tmp_path / "out.ecsv"),
            "--overwrite"]
    return cube, log, env, args


@pytest.mark.parametrize("kill_after", [1, 16, 43])  # rows answered before kill -9
def test_sigkill_then_rerun_repeats_no_stored_call(tmp_path, kill_after):
    n = 60
    cube, log, env, args = counted_cli_run(tmp_path, n, seed=3, delay=0.05)

    proc = cli(args, env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until some, not all, rows are answered
        if log.exists() and len(log.read_text().split()) >= kill_after:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out.ecsv").exists()
    with ResultStore(tmp_path / "s.sqlite") as store:
        stored_before = len(store)
    assert stored_before < n  # (0 when killed between the answer and its storing)
    first_calls = [int(r) for r in log.read_text().split()]

    log.unlink()
    env["GLUE_VLM_TEST_DELAY"] = "0"
    rerun = cli(args, env)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    second_calls = [int(r) for r in log.read_text().split()]
    # rows answered and stored before the kill are not asked again; every row is
    # asked at least once over both runs
    assert len(second_calls) <= n - stored_before
    assert set(first_calls) | set(second_calls) == set(range(n))
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert len(store) == n

    straight = CountingBackend()
    expected = classify(CubeSource(cube), range(n), TASK, straight, store=None)
    table = Table.read(tmp_path / "out.ecsv")
    assert np.array_equal(np.asarray(table["galaxy_morphology_code"]), expected.codes)
    assert list(table["galaxy_morphology_label"]) == list(expected.labels)


def test_ctrl_c_stops_after_the_batch_writes_what_is_done_and_the_rerun_finishes(tmp_path):
    n = 40
    _, log, env, args = counted_cli_run(tmp_path, n, seed=4, delay=0.1)
    proc = cli(args, env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists() and log.read_text().split()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopping after the current batch" in err and "run the same command again" in err
    partial = Table.read(tmp_path / "out.ecsv")
    done = np.asarray(partial["galaxy_morphology_code"]) >= 0
    assert 0 < done.sum() < n and not partial.meta["glue_vlm"]["complete"]

    asked_before = len(log.read_text().split())
    env["GLUE_VLM_TEST_DELAY"] = "0"
    rerun = cli(args, env)
    _, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    assert len(log.read_text().split()) - asked_before == n - done.sum()
    final = Table.read(tmp_path / "out.ecsv")
    assert (np.asarray(final["galaxy_morphology_code"]) >= 0).all()
    assert final.meta["glue_vlm"]["complete"]
