"""A recognisable fake key goes through a whole CLI run against a server that echoes it;
it must appear nowhere: not in the store, the output table, the logs, or any message."""

import inspect
import os
import subprocess
import sys
import uuid

import numpy as np
from astropy.table import Table

from glue_vlm.backends.local import LocalBackend
from glue_vlm.testing.openai_server import DEFAULT_MODEL, OpenAITestServer


def cli(args, key):
    env = dict(os.environ, OPENAI_API_KEY=key, GLUE_VLM_OPENAI_BACKOFF="0.01")
    return subprocess.run([sys.executable, "-m", "glue_vlm.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_fake_key_leaks_nowhere(tmp_path):
    key = f"sk-glue-vlm-FAKE-{uuid.uuid4().hex}"
    n = 6
    np.save(tmp_path / "cube.npy", np.random.default_rng(0).integers(
        0, 255, (n, 16, 16, 3), dtype=np.uint8))
    Table({"id": np.arange(n)}).write(tmp_path / "cat.ecsv")
    args = ["classify", str(tmp_path / "cat.ecsv"), "--task", "lsbg-vs-artifact",
            "--stamps", str(tmp_path / "cube.npy"), "--backend", "openai",
            "--model", DEFAULT_MODEL]
    # the server wants the key and echoes it back in its free-text answers
    with OpenAITestServer(api_key=key, json_schema="ignore", choice="reject",
                          text_template="Called with " + key + ", I say {key}.") as server:
        url = ["--base-url", server.base_url]
        good = cli(args + url + ["-o", str(tmp_path / "out.ecsv"),
                                 "--store", str(tmp_path / "s.sqlite")], key)
        # a wrong key: the server's 401 body quotes the key it was sent
        wrong = cli(args + url + ["-o", str(tmp_path / "out2.ecsv"),
                                  "--store", str(tmp_path / "s2.sqlite")], key + "-wrong")
    assert good.returncode == 0, good.stderr
    assert wrong.returncode == 1 and "API key" in wrong.stderr
    assert Table.read(tmp_path / "out.ecsv")["lsbg_vs_artifact_code"].min() >= 0

    for path in tmp_path.iterdir():  # store (+ WAL), tables, everything written
        assert key.encode() not in path.read_bytes(), path.name
    for text in (good.stdout, good.stderr, wrong.stdout, wrong.stderr):
        assert key not in text


def test_local_models_run_no_remote_code_by_default():
    assert inspect.signature(LocalBackend).parameters["trust_remote_code"].default is False
