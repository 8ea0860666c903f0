"""The local transformers backend on a tiny random LLaVA-NeXT loaded by directory.

The model is real (save_pretrained / from_pretrained, real processor, chat template and
tokenizer); its weights are random, so tests check consistency, never accuracy.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from glue_vlm.backends.base import BackendError
from glue_vlm.backends.local import (LocalBackend, loaded_models, option_token_ids,
                                     release_models)
from glue_vlm.parsing import parse_answer
from glue_vlm.stamps import Stamp
from glue_vlm.tasks import PRESETS

MORPHOLOGY = PRESETS["galaxy-morphology"]   # letter options A-D
PAPER_LSBG = PRESETS["paper-lsbg"]          # number options 0-1
TOL = 1e-4


def make_stamps(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Stamp(index=i, row=i, pixels=rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for i, (h, w) in enumerate(sizes)]


def max_difference(a, b):
    return max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities)


@pytest.fixture(scope="module")
def scorer(tiny_llava_dir):
    backend = LocalBackend(str(tiny_llava_dir), device="cpu", batch_size=8)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def generator(tiny_llava_dir):
    backend = LocalBackend(str(tiny_llava_dir), device="cpu", mode="generate",
                           max_new_tokens=8)
    yield backend
    backend.close()


# -- scoring ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [MORPHOLOGY, PAPER_LSBG], ids=lambda t: t.slug)
def test_scores_are_a_distribution_over_the_labels(scorer, task):
    predictions = scorer.predict(make_stamps([(48, 48)] * 3), task)
    for p in predictions:
        assert p.ok and p.method == "score"
        assert list(p.probabilities) == task.label_names
        values = np.array(list(p.probabilities.values()))
        assert np.all(np.isfinite(values)) and np.all(values >= 0)
        assert values.sum() == pytest.approx(1.0, abs=1e-5)
        assert p.label == max(p.probabilities, key=p.probabilities.get)
        assert p.confidence == p.probabilities[p.label]
        assert p.prompt_tokens > 0


def test_scores_depend_on_the_image(scorer):
    """Guards the other tests against a model whose output ignores its input."""
    a, b = scorer.predict(make_stamps([(48, 48)] * 2, seed=3), MORPHOLOGY)
    assert max_difference(a, b) > 1e-3


def test_scores_pool_every_spelling_of_each_option(scorer):
    """The probability of option A is p("A") + p("▁A") at the answer position,
    renormalised over the options: recomputed here from the model's raw logits."""
    import torch

    loaded = scorer.load()
    tokenizer = loaded.processor.tokenizer
    ids = option_token_ids(tokenizer, MORPHOLOGY)
    for key, spellings in zip(MORPHOLOGY.option_keys, ids):
        assert sorted(tokenizer.convert_ids_to_tokens(spellings)) == sorted([key, "▁" + key])
    stamps = make_stamps([(40, 40)], seed=5)
    inputs = loaded.processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "image", "image": stamps[0].pixels},
                                       {"type": "text", "text": MORPHOLOGY.render_prompt()}]}]],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    text = tokenizer.decode(inputs["input_ids"][0])
    assert text.rstrip().endswith("[/INST]") and "[INST]" in text  # the model's own format
    with torch.no_grad():
        probs = torch.softmax(loaded.model(**inputs).logits[0, -1].float(), dim=-1)
    mass = np.array([probs[s].sum().item() for s in ids])
    expected = mass / mass.sum()
    got = scorer.predict(stamps, MORPHOLOGY)[0].probabilities
    np.testing.assert_allclose([got[n] for n in MORPHOLOGY.label_names], expected, atol=TOL)


def test_batched_scores_equal_one_at_a_time(scorer):
    stamps = make_stamps([(48, 48)] * 5, seed=1)
    batched = scorer.predict(stamps, MORPHOLOGY)
    for stamp, together in zip(stamps, batched):
        alone = scorer.predict([stamp], MORPHOLOGY)[0]
        assert max_difference(together, alone) < TOL
        assert together.label == alone.label


def test_left_padding_does_not_change_scores(scorer):
    """Stamps of different sizes make prompts of different lengths in one batch."""
    stamps = make_stamps([(64, 64), (20, 30), (48, 24), (36, 36)], seed=2)
    batched = scorer.predict(stamps, PAPER_LSBG)
    lengths = {p.prompt_tokens for p in batched}
    assert len(lengths) >= 3  # the batch really was padded
    for stamp, together in zip(stamps, batched):
        alone = scorer.predict([stamp], PAPER_LSBG)[0]
        assert together.prompt_tokens == alone.prompt_tokens
        assert max_difference(together, alone) < TOL


def test_a_failed_stamp_fails_its_row_only(scorer):
    stamps = make_stamps([(32, 32)] * 3)
    stamps[1] = Stamp(index=1, row=1, pixels=None, error="outside the image")
    stamps.append(Stamp(index=3, row=3, pixels=np.zeros((8, 8), dtype=np.uint8)))
    out = scorer.predict(stamps, MORPHOLOGY)
    assert [p.ok for p in out] == [True, False, True, False]
    assert out[1].error == "outside the image"
    assert "expected (H, W, 3)" in out[3].error
    assert max_difference(out[0], scorer.predict(stamps[:1], MORPHOLOGY)[0]) < TOL


# -- generation ---------------------------------------------------------------------------
def test_generation_returns_text_read_by_the_parser(generator):
    stamps = make_stamps([(48, 48), (24, 40), (32, 32)], seed=4)
    batched = generator.predict(stamps, MORPHOLOGY)
    for stamp, p in zip(stamps, batched):
        assert p.method == "generate" and p.probabilities is None
        assert p.raw_text.strip()
        assert 0 < p.completion_tokens <= 8
        assert p.label == parse_answer(p.raw_text, MORPHOLOGY)
        assert p.error == (None if p.label else "unparsed answer")
        alone = generator.predict([stamp], MORPHOLOGY)[0]  # greedy: batching changes nothing
        assert alone.raw_text == p.raw_text


# -- batch size adapts to memory ----------------------------------------------------------
def test_out_of_memory_halves_the_batch_and_retries(tiny_llava_dir, monkeypatch):
    import torch

    backend = LocalBackend(str(tiny_llava_dir), device="cpu", batch_size=8)
    real_run = LocalBackend._run
    seen = []

    def run_with_small_memory(self, loaded, images, task, option_ids):
        seen.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_run(self, loaded, images, task, option_ids)

    monkeypatch.setattr(LocalBackend, "_run", run_with_small_memory)
    stamps = make_stamps([(32, 32)] * 5, seed=6)
    out = backend.predict(stamps, MORPHOLOGY)
    assert seen == [5, 4, 2, 2, 1]  # 5 fit in a batch of 8; halved to 4, then 2
    assert backend.batch_size == 2
    monkeypatch.setattr(LocalBackend, "_run", real_run)
    for stamp, p in zip(stamps, out):
        assert max_difference(p, backend.predict([stamp], MORPHOLOGY)[0]) < TOL

    def always_out_of_memory(self, loaded, images, task, option_ids):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")

    monkeypatch.setattr(LocalBackend, "_run", always_out_of_memory)
    with pytest.raises(BackendError, match="out of memory on cpu with one stamp at a time"):
        backend.predict(stamps, MORPHOLOGY)
    assert backend.batch_size == 1


# -- loading once, releasing --------------------------------------------------------------
def test_model_is_shared_across_engines_until_released(tiny_llava_dir):
    first = LocalBackend(str(tiny_llava_dir), device="cpu")
    second = LocalBackend(str(tiny_llava_dir), device="cpu", batch_size=2)
    model = first.load().model
    assert second.load().model is model
    first.close()
    assert LocalBackend(str(tiny_llava_dir), device="cpu").load().model is model
    assert release_models(str(tiny_llava_dir)) == 1
    assert not [key for key in loaded_models() if key[0] == str(tiny_llava_dir)]
    assert LocalBackend(str(tiny_llava_dir), device="cpu").load().model is not model


def test_settings_hold_what_changes_answers(tiny_llava_dir):
    score = LocalBackend(str(tiny_llava_dir), device="cpu", batch_size=3)
    assert score.settings() == LocalBackend(str(tiny_llava_dir), device="cpu",
                                            batch_size=16).settings()
    assert score.settings()["dtype"] == "float32" and score.settings()["mode"] == "score"
    assert "batch_size" not in score.settings() and "device" not in score.settings()
    short = LocalBackend(str(tiny_llava_dir), device="cpu", mode="generate", max_new_tokens=5)
    long = LocalBackend(str(tiny_llava_dir), device="cpu", mode="generate", max_new_tokens=50)
    assert short.settings() != long.settings() != score.settings()
    json.dumps(score.settings())
    assert score.gives_probabilities and not short.gives_probabilities


def test_cost_estimate_counts_the_tokens_a_stamp_costs(scorer):
    estimate = scorer.estimate_cost(7, MORPHOLOGY)
    big = Stamp(index=0, row=0, pixels=np.zeros((336, 336, 3), dtype=np.uint8))
    per_image = scorer.predict([big], MORPHOLOGY)[0].prompt_tokens
    assert estimate.input_tokens == 7 * per_image
    assert estimate.output_tokens == 0 and estimate.dollars is None


# -- clear errors ------------------------------------------------------------------------
def test_a_text_only_model_is_refused(tmp_path):
    from transformers import MistralConfig

    MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  architectures=["MistralForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(BackendError, match="not an image-text-to-text model "
                                           r"\(MistralForCausalLM\)"):
        LocalBackend(str(tmp_path), device="cpu")


def test_a_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(BackendError, match="has no config.json"):
        LocalBackend(str(tmp_path), device="cpu")
    with pytest.raises(BackendError, match="does not exist"):
        LocalBackend(str(tmp_path / "missing"), device="cpu")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(tiny_llava_dir):
    with pytest.raises(BackendError, match="'cuda' was asked for but .*--device cpu"):
        LocalBackend(str(tiny_llava_dir), device="cuda")


def test_quantization_without_bitsandbytes_is_refused(tiny_llava_dir):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(BackendError, match="4bit loading needs bitsandbytes.*pip install"):
        LocalBackend(str(tiny_llava_dir), device="cpu", quantization="4bit")


def test_bad_options_are_refused(tiny_llava_dir):
    for options, message in [({"mode": "chat"}, "mode 'chat'"),
                             ({"device": "tpu"}, "unknown device 'tpu'"),
                             ({"dtype": "int3"}, "dtype 'int3'"),
                             ({"quantization": "2bit"}, "quantization '2bit'")]:
        with pytest.raises(BackendError, match=message):
            LocalBackend(str(tiny_llava_dir), **options)


def run_python(code, tmp_path, **env):
    environ = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, timeout=300)


def test_weights_missing_offline_gives_one_clear_line(tmp_path):
    code = ("from glue_vlm.backends.base import BackendError\n"
            "from glue_vlm.backends.local import LocalBackend\n"
            "try:\n    LocalBackend('made-up-org/no-such-vlm', device='cpu')\n"
            "except BackendError as exc:\n    print(exc)\n")
    out = run_python(code, tmp_path, HF_HUB_OFFLINE="1")
    message = out.stdout.strip()
    assert out.returncode == 0, out.stderr
    assert "\n" not in message
    assert message.startswith("model 'made-up-org/no-such-vlm' is not in the Hugging Face "
                              "cache and cannot be downloaded")
    assert "--model" in message


def test_importing_the_backend_does_not_import_torch(tmp_path):
    code = ("import sys, glue_vlm.backends.local\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = run_python(code, tmp_path)
    assert out.stdout.strip() == "[]", out.stderr


# -- bench/gpu_local.py (no GPU here: its arithmetic and its refusal) ---------------------
def load_gpu_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_local.py"
    spec = importlib.util.spec_from_file_location("gpu_local_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_builds_the_published_7b_architecture():
    import torch
    from transformers import LlavaNextForConditionalGeneration

    bench = load_gpu_bench()
    with torch.device("meta"):  # shapes only, no memory
        model = LlavaNextForConditionalGeneration(bench.llava_next_7b_config(32000))
    # llava-hf/llava-v1.6-mistral-7b-hf has 7,566,747,648 parameters
    assert sum(p.numel() for p in model.parameters()) == 7_566_747_648
    lm, vision = bench.parameter_counts(model)
    assert lm + vision + 2 * 32064 * 4096 == 7_566_747_648
    pixel_values = torch.zeros(1, 3, 3, 336, 336, device="meta")  # base + 2 crops
    assert bench.vision_tokens_per_image(pixel_values, model.config) == 3 * 577


def test_gpu_bench_arguments_and_refusal_without_cuda(capsys):
    import torch

    bench = load_gpu_bench()
    assert bench.parse_args([]).batch_sizes == [1, 2, 4, 8, 16, 32, 64]
    assert bench.parse_args(["--batch-sizes", "4, 16"]).batch_sizes == [4, 16]
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-sizes", "0"])
    if not torch.cuda.is_available():
        assert bench.main([]) == 1
        assert "no CUDA GPU is visible" in capsys.readouterr().err


# -- the command line, end to end ---------------------------------------------------------
def test_cli_classifies_with_the_local_backend(tiny_llava_dir, tmp_path):
    """`glue-vlm classify --backend local` in a fresh process, offline; the columns hold
    what the engine says for the same prepared stamps; a rerun answers from the store."""
    from astropy.table import Table

    from glue_vlm.run import stamp_settings_for
    from glue_vlm.stamps import CubeSource, StampSettings, iter_stamps

    rng = np.random.default_rng(7)
    cube = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "cube.npy", cube)
    Table({"id": np.arange(6)}).write(tmp_path / "cat.ecsv")
    args = ["classify", str(tmp_path / "cat.ecsv"), "--task", "galaxy-morphology",
            "--backend", "local", "--model", str(tiny_llava_dir), "--device", "cpu",
            "--mode", "score", "--batch-size", "4", "--stamps", str(tmp_path / "cube.npy"),
            "--store", str(tmp_path / "store.sqlite")]

    def glue_vlm(output):
        cli = os.path.join(os.path.dirname(sys.executable), "glue-vlm")
        done = subprocess.run([cli, *args, "-o", str(tmp_path / output)], text=True,
                              capture_output=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "cached 0" in glue_vlm("out.ecsv")
    out = Table.read(tmp_path / "out.ecsv")
    names = MORPHOLOGY.label_names
    probs = np.stack([np.asarray(out[f"galaxy_morphology_p_{n}"]) for n in names], axis=1)
    backend = LocalBackend(str(tiny_llava_dir), device="cpu")
    stamps = list(iter_stamps(CubeSource(cube), range(6),
                              stamp_settings_for(backend, StampSettings())))
    direct = backend.predict(stamps, MORPHOLOGY)
    np.testing.assert_allclose(probs, [[p.probabilities[n] for n in names] for p in direct],
                               atol=TOL)
    assert list(out["galaxy_morphology_label"]) == [p.label for p in direct]
    assert out.meta["glue_vlm"]["backend"] == "local"
    assert out.meta["glue_vlm"]["settings"]["mode"] == "score"

    assert "6/6  cached 6  failed 0" in glue_vlm("again.ecsv")
    again = Table.read(tmp_path / "again.ecsv")
    assert list(again["galaxy_morphology_code"]) == list(out["galaxy_morphology_code"])
