"""The OpenAI backend against the real ``transformers serve`` (a real OpenAI-compatible
server) serving a tiny random LLaVA-NeXT built offline: the server ignores
``response_format`` and ``logprobs`` and refuses vLLM's extra fields with 422, so the
backend must settle on free text and record it; then ``glue-vlm classify`` end to end."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from glue_vlm.backends.openai import OpenAIBackend
from glue_vlm.columns import column_names, probability_column
from glue_vlm.parsing import parse_answer
from glue_vlm.run import stamp_settings_for
from glue_vlm.stamps import CubeSource, Stamp, encode_png, iter_stamps
from glue_vlm.store import ResultStore, run_context, stamp_key
from glue_vlm.tasks import PRESETS

pytestmark = pytest.mark.slow

TASK = PRESETS["lsbg-vs-artifact"]
KEY = "sk-e2e-0123456789abcdefSECRET"


def make_cube(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_backend_settles_on_free_text_and_records_it(transformers_server, tiny_llava_dir):
    cube = make_cube(3)
    stamps = [Stamp(i, i, px, encode_png(px)) for i, px in enumerate(cube)]
    stamps.append(Stamp(3, 3, cube[0], encode_png(cube[0])))  # the same stamp again
    backend = OpenAIBackend(model=str(tiny_llava_dir), base_url=transformers_server,
                            concurrency=2, timeout=120, backoff=0.05)
    with backend:
        preds = backend.predict(stamps, TASK)
    assert backend.mode == "parse" and not backend.gives_probabilities
    # the probe: schema accepted but ignored (200), choice refused (422), free text (200)
    assert backend.stats.requests == len(stamps) + 2
    for pred in preds:
        assert pred.method == "parse" and pred.probabilities is None
        assert pred.raw_text and pred.prompt_tokens > 0 and pred.completion_tokens > 0
        assert pred.label == parse_answer(pred.raw_text, TASK)
        assert pred.ok or "names none of the labels" in pred.error
    # temperature 0 reaches the server: greedy decoding answers the same stamp alike
    assert preds[3].raw_text == preds[0].raw_text
    assert backend.usage.prompt_tokens == sum(p.prompt_tokens for p in preds)


def test_cli_classify_end_to_end(transformers_server, tiny_llava_dir, tmp_path):
    n = 4
    cube = make_cube(n, seed=7)
    np.save(tmp_path / "stamps.npy", cube)
    Table({"id": np.arange(n), "mag": np.linspace(20, 23, n)}).write(tmp_path / "cat.ecsv")
    store_path = tmp_path / "results.sqlite"
    command = [str(Path(sys.executable).parent / "glue-vlm"), "classify",
               str(tmp_path / "cat.ecsv"), "--task", TASK.slug, "--backend", "openai",
               "--model", str(tiny_llava_dir), "--base-url", transformers_server,
               "--concurrency", "2", "--stamps", str(tmp_path / "stamps.npy"),
               "-o", str(tmp_path / "out.ecsv"), "--store", str(store_path)]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "GLUE_VLM_OPENAI_BACKOFF": "0.05"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "self-hosted server: no price" in done.stderr

    out = Table.read(tmp_path / "out.ecsv")
    assert list(out["id"]) == list(range(n))
    for name in column_names(TASK):
        assert name in out.colnames
    prefix = TASK.column_prefix
    # what the store holds for each row is what the table says
    backend = OpenAIBackend(model=str(tiny_llava_dir), base_url=transformers_server)
    context = run_context(TASK, backend)
    stamps = list(iter_stamps(CubeSource(cube), range(n), stamp_settings_for(backend)))
    keys = [stamp_key(context, st.pixels) for st in stamps]
    with ResultStore(store_path) as store:
        stored = store.get_many(keys)
    assert len(stored) == n
    for row, key in enumerate(keys):
        pred = stored[key]
        assert pred.method == "parse" and pred.raw_text
        assert pred.label == parse_answer(pred.raw_text, TASK)
        if pred.ok:
            assert out[f"{prefix}_label"][row] == pred.label
            assert out[f"{prefix}_code"][row] == TASK.label_names.index(pred.label)
        else:
            assert out[f"{prefix}_label"][row] == "unclassified"
            assert out[f"{prefix}_code"][row] == -1
        # free text carries no probabilities: confidence unknown, not invented
        assert np.isnan(out[f"{prefix}_confidence"][row])
        for label in TASK.label_names:
            assert np.isnan(out[probability_column(TASK, label)][row])
    assert out.meta["glue_vlm"]["settings"]["server"] == "compatible"
    for path in tmp_path.iterdir():
        assert KEY.encode() not in path.read_bytes()
