"""In-process image-text-to-text models through transformers (LLaVA-NeXT first).

Any model that ``AutoProcessor`` + ``AutoModelForImageTextToText`` load works: a Hugging
Face id found in the local cache, or a directory written by ``save_pretrained``. Prompts
go only through the processor's own chat template.

Two modes:

``score`` (default)
    The labels are offered as options (``task.option_keys``: A, B, ... or 0, 1, ...).
    One batched forward pass; the next-token distribution at the answer position,
    restricted to the option tokens, is the class probability. An option counts under
    every spelling the vocabulary has for it at the start of an answer (``A``, ``▁A``
    in sentencepiece vocabularies, ``ĠA`` in byte-level ones): their probabilities are
    summed before normalising over the options.
``generate``
    Free text (greedy, ``max_new_tokens``), read by ``glue_vlm.parsing.parse_answer``:
    what the study did, done in batches.

In score mode ``Prediction.raw_text`` is the model's most likely next token over its
whole vocabulary: a check that it meant to answer with an option at all.

Both pad on the left. Models are loaded once per process and shared by every
``LocalBackend`` with the same load settings, so a panel keeps one warm across runs:
``close()`` only lets go of this engine's reference; ``release_models()`` frees the
memory (GPU included).
"""

from __future__ import annotations

import gc
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .base import Backend, BackendError, CostEstimate, Prediction

if TYPE_CHECKING:  # pragma: no cover
    from ..stamps import Stamp
    from ..tasks import Task

__all__ = ["LocalBackend", "release_models", "loaded_models", "DEFAULT_MODEL"]

DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"
MODES = ("score", "generate")
QUANTIZATIONS = (None, "4bit", "8bit")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}
#: how a leading space is spelled in a token, per vocabulary family
SPACE_MARKS = ("", "▁", "Ġ", " ")
#: stamp side assumed by ``estimate_cost`` (stamps are never larger than this)
ESTIMATE_SIDE = 336


@dataclass
class LoadedModel:
    processor: Any
    model: Any
    device: str


_MODELS: dict[tuple, LoadedModel] = {}
_LOCK = threading.Lock()


def loaded_models() -> list[tuple]:
    """Load settings (model, device, dtype, quantization, trust_remote_code) of every
    model held in memory."""
    with _LOCK:
        return list(_MODELS)


def release_models(model: str | None = None) -> int:
    """Free the models held in memory (only those loaded from ``model`` if given) and
    return how many were freed. Engines that used them reload on their next call."""
    with _LOCK:
        keys = [key for key in _MODELS if model is None or key[0] == model]
        for key in keys:
            del _MODELS[key]
    if keys:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            torch.mps.empty_cache()
    return len(keys)


class LocalBackend(Backend):
    """A transformers image-text-to-text model run in this process."""

    name = "local"
    accepts = "array"
    max_stamp_size = 336

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", mode: str = "score",
                 batch_size: int = 8, dtype: str | None = None,
                 quantization: str | None = None, max_new_tokens: int = 20,
                 trust_remote_code: bool = False):
        if mode not in MODES:
            raise BackendError(f"mode {mode!r} is not one of: {', '.join(MODES)}")
        if quantization not in QUANTIZATIONS:
            raise BackendError(f"quantization {quantization!r} is not one of: 4bit, 8bit")
        if int(batch_size) < 1 or int(max_new_tokens) < 1:
            raise BackendError("batch_size and max_new_tokens must be at least 1")
        if dtype is not None and dtype not in DTYPES:
            raise BackendError(f"dtype {dtype!r} is not one of: float32, bfloat16, float16")
        self.model = str(model)
        self.mode = mode
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.trust_remote_code = bool(trust_remote_code)
        self.quantization = quantization
        self.gives_probabilities = mode == "score"
        if quantization and importlib.util.find_spec("bitsandbytes") is None:
            raise BackendError(f"{quantization} loading needs bitsandbytes, which is not "
                               "installed: pip install bitsandbytes (CUDA only), or drop "
                               "--quantization")
        self.device = resolve_device(device)
        if quantization and not self.device.startswith("cuda"):
            raise BackendError(f"{quantization} quantization needs a CUDA GPU; the device "
                               f"is {self.device}: drop --quantization")
        self.dtype = DTYPES[dtype] if dtype else default_dtype(self.device)
        self._source = check_model_source(self.model, self.trust_remote_code)
        self._loaded: LoadedModel | None = None
        self._processor = None  # for estimates before the weights are loaded

    # -- protocol -------------------------------------------------------------------
    def settings(self) -> dict:
        """What changes the answers: model, mode, numeric precision and, for free text,
        the answer length. Not batch size or which GPU."""
        out = {"backend": self.name, "model": self.model, "mode": self.mode,
               "dtype": self.dtype, "quantization": self.quantization}
        if self.mode == "generate":
            out["max_new_tokens"] = self.max_new_tokens
        return out

    def estimate_cost(self, n_images: int, task: "Task") -> CostEstimate:
        """Tokens through the model for ``n_images`` square stamps of up to 336 px; no
        money. Needs only the processor (no weights)."""
        import numpy as np

        try:
            processor = self._processor_only()
            image = np.zeros((ESTIMATE_SIDE, ESTIMATE_SIDE, 3), dtype=np.uint8)
            inputs = self._encode(processor, [image], task, return_tensors=None)
            per_image = len(inputs["input_ids"][0])
        except BackendError as exc:
            return CostEstimate(n_images, 0, 0, None, f"no estimate: {exc}")
        if self.mode == "score":
            return CostEstimate(n_images, per_image * n_images, 0, None,
                                "local, one forward pass an image, no charge")
        return CostEstimate(n_images, per_image * n_images, self.max_new_tokens * n_images,
                            None, f"local, at most {self.max_new_tokens} output tokens an "
                            "image, no charge")

    def predict(self, stamps: Sequence["Stamp"], task: "Task") -> list[Prediction]:
        results: list[Prediction | None] = [None] * len(stamps)
        good = []
        for i, stamp in enumerate(stamps):
            problem = stamp_problem(stamp)
            if problem:
                results[i] = Prediction.failed(problem, method=self.mode)
            else:
                good.append(i)
        if good:
            loaded = self.load()
            option_ids = (option_token_ids(loaded.processor.tokenizer, task)
                          if self.mode == "score" else None)
            start = 0
            while start < len(good):
                chunk = good[start:start + self.batch_size]
                try:
                    answers = self._run(loaded, [stamps[i].pixels for i in chunk], task,
                                        option_ids)
                except BackendError:
                    raise
                except Exception as exc:  # noqa: BLE001 - out-of-memory has no common type
                    if not is_out_of_memory(exc):
                        raise BackendError(f"{self.model} failed on a batch of "
                                           f"{len(chunk)} stamps: {first_line(exc)}") from exc
                    self._shrink_batch()
                    continue
                for i, answer in zip(chunk, answers):
                    results[i] = answer
                start += len(chunk)
        return results

    def close(self) -> None:
        """Let go of this engine's model; it stays loaded for the next engine with the
        same settings until ``release_models()``."""
        self._loaded = None

    # -- loading --------------------------------------------------------------------
    @property
    def load_key(self) -> tuple:
        return (self.model, self.device, self.dtype, self.quantization,
                self.trust_remote_code)

    def load(self) -> LoadedModel:
        """The model and processor, loaded on first use and shared across engines."""
        if self._loaded is None:
            with _LOCK:
                loaded = _MODELS.get(self.load_key)
                if loaded is None:
                    loaded = _MODELS[self.load_key] = self._load()
            self._loaded = loaded
        return self._loaded

    def _processor_only(self):
        if self._loaded is not None:
            return self._loaded.processor
        if self._processor is None:
            self._processor = load_processor(self._source, self.model,
                                             self.trust_remote_code)
        return self._processor

    def _load(self) -> LoadedModel:
        import torch
        from transformers import AutoModelForImageTextToText

        processor = load_processor(self._source, self.model, self.trust_remote_code)
        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype),
                                  "trust_remote_code": self.trust_remote_code}
        if self.device.startswith("cuda"):
            kwargs["attn_implementation"] = "sdpa"
            kwargs["device_map"] = {"": self.device}
        if self.quantization:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=kwargs["dtype"])
                if self.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        try:
            model = AutoModelForImageTextToText.from_pretrained(self._source, **kwargs)
        except OSError as exc:
            raise BackendError(missing_weights_message(self.model, exc)) from None
        except ValueError as exc:
            raise BackendError(f"cannot load {self.model}: {first_line(exc)}") from None
        if not self.device.startswith("cuda"):
            model = model.to(self.device)
        model.eval()
        return LoadedModel(processor, model, self.device)

    # -- inference ------------------------------------------------------------------
    def _encode(self, processor, images, task: "Task", return_tensors="pt"):
        """Chat-template the prompt with each image and tokenize, padded on the left."""
        prompt = task.render_prompt()
        conversations = [[{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
            for image in images]
        try:
            return processor.apply_chat_template(
                conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors=return_tensors,
                processor_kwargs={"padding": True, "padding_side": "left",
                                  "input_data_format": "channels_last"})
        except (ValueError, TypeError, KeyError) as exc:
            raise BackendError(f"{self.model}: its processor cannot prepare an image and "
                               f"a prompt: {first_line(exc)}") from None

    def _run(self, loaded: LoadedModel, images, task: "Task", option_ids) -> list[Prediction]:
        import torch

        inputs = self._encode(loaded.processor, images, task).to(loaded.model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode():
            if self.mode == "score":
                logits = loaded.model(**inputs, logits_to_keep=1,
                                      use_cache=False).logits[:, -1, :]
                return score_predictions(logits.float(), option_ids, task,
                                         loaded.processor.tokenizer, prompt_tokens)
            tokenizer = loaded.processor.tokenizer
            output = loaded.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [self._parse(tokenizer, row, task, n_in) for row, n_in in
                zip(new_tokens.tolist(), prompt_tokens)]

    def _parse(self, tokenizer, token_ids: list[int], task: "Task",
               prompt_tokens: int) -> Prediction:
        from ..parsing import parse_answer

        stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        used = next((i for i, t in enumerate(token_ids) if t in stop), len(token_ids))
        text = tokenizer.decode(token_ids[:used], skip_special_tokens=True).strip()
        label = parse_answer(text, task)
        return Prediction(label=label, raw_text=text, method="generate",
                          error=None if label else "unparsed answer",
                          prompt_tokens=int(prompt_tokens), completion_tokens=used)

    def _shrink_batch(self) -> None:
        """After running out of memory: halve the batch size (kept for later calls)."""
        gc.collect()
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        elif self.device == "mps":
            torch.mps.empty_cache()
        if self.batch_size == 1:
            raise BackendError(f"out of memory on {self.device} with one stamp at a time: "
                               "use --quantization 4bit, a smaller model or smaller "
                               "stamps") from None
        self.batch_size = max(1, self.batch_size // 2)


# -- helpers (module level so tests and benchmarks can use them) ----------------------
def resolve_device(device: str) -> str:
    """``auto`` -> cuda, mps or cpu, whichever exists; check an explicit choice exists."""
    import torch

    device = (device or "auto").strip().lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "mps":
        if not has_mps:
            raise BackendError("device 'mps' was asked for but this PyTorch sees no Apple "
                               "GPU: use --device cpu or auto")
        return "mps"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = ("this PyTorch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU or driver is visible")
            raise BackendError(f"device {device!r} was asked for but {why}: use --device "
                               "cpu or auto")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise BackendError(f"device {device!r} does not exist: this machine has "
                               f"{torch.cuda.device_count()} CUDA GPU(s)")
        return device
    raise BackendError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")


def default_dtype(device: str) -> str:
    """bfloat16 on CUDA (float16 on GPUs without it), float16 on MPS, float32 on CPU."""
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float16" if device == "mps" else "float32"


def looks_like_path(model: str) -> bool:
    return (model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model
            or Path(model).expanduser().exists())


def check_model_source(model: str, trust_remote_code: bool) -> str:
    """Where to load from (a directory or a hub id), after checking that its config can
    be read and names an image-text-to-text model. Reads no weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    source = model
    if looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise BackendError(f"model directory {model} does not exist")
        if not (path / "config.json").is_file():
            raise BackendError(f"{model} has no config.json: not a transformers model "
                               "directory (write one with save_pretrained)")
        source = str(path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise BackendError(missing_weights_message(model, exc)) from None
    except ValueError as exc:
        raise BackendError(f"cannot read the config of {model}: {first_line(exc)}") from None
    remote = "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not remote:
        arch = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        raise BackendError(f"{model} is not an image-text-to-text model ({arch}): choose a "
                           f"vision-language model such as {DEFAULT_MODEL}")
    return source


def load_processor(source: str, model: str, trust_remote_code: bool):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise BackendError(missing_weights_message(model, exc)) from None
    except ValueError as exc:
        raise BackendError(f"cannot load the processor of {model}: {first_line(exc)}") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise BackendError(f"{model} has no image processor and tokenizer: not an "
                           "image-text-to-text model directory")
    if not getattr(processor, "chat_template", None):
        raise BackendError(f"{model} has no chat template: add one (chat_template.jinja) "
                           "so prompts are formatted the way the model was trained")
    return processor


def missing_weights_message(model: str, exc: Exception) -> str:
    text = str(exc)
    if "couldn't connect" in text or "offline" in text.lower() or "cached files" in text:
        return (f"model {model!r} is not in the Hugging Face cache and cannot be downloaded "
                "here (no network, or HF_HUB_OFFLINE is set): download it on a machine "
                f"with network (hf download {model}) and copy the cache, or pass a local "
                "directory with --model")
    return f"cannot load model {model!r}: {first_line(exc)}"


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def stamp_problem(stamp: "Stamp") -> str | None:
    """Why a stamp cannot be shown to the model, or None."""
    if stamp.error:
        return stamp.error
    pixels = stamp.pixels
    if pixels is None:
        return "no stamp"
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 2:
        return f"stamp has shape {pixels.shape}, expected (H, W, 3) with H, W >= 2"
    return None


def is_out_of_memory(exc: Exception) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def option_token_ids(tokenizer, task: "Task") -> list[list[int]]:
    """For each option key, every token id that spells it at the start of an answer
    (with or without a leading-space mark). Raises BackendError when an option has no
    single token or two options share one (scoring could not tell them apart)."""
    vocab = tokenizer.get_vocab()
    out: list[list[int]] = []
    owner: dict[int, str] = {}
    for key in task.option_keys:
        ids = sorted({vocab[mark + key] for mark in SPACE_MARKS if mark + key in vocab})
        if not ids:
            raise BackendError(f"option {key!r} of task {task.slug!r} is not one token in "
                               "this model's vocabulary, so it cannot be scored: use "
                               "--mode generate or a task with fewer labels")
        for token_id in ids:
            if token_id in owner:
                raise BackendError(f"options {owner[token_id]!r} and {key!r} of task "
                                   f"{task.slug!r} share a token: use --mode generate")
            owner[token_id] = key
        out.append(ids)
    return out


def score_predictions(logits, option_ids: list[list[int]], task: "Task", tokenizer,
                      prompt_tokens: list[int]) -> list[Prediction]:
    """Class probabilities from next-token logits (batch x vocab): each option's
    spellings are pooled (log-sum-exp), then a softmax over the options."""
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    pooled = torch.stack([torch.logsumexp(logprobs[:, ids], dim=-1) for ids in option_ids],
                         dim=-1)
    probs = torch.softmax(pooled, dim=-1)
    top_tokens = logits.argmax(dim=-1).tolist()
    names = task.label_names
    predictions = []
    for row, top, n_in in zip(probs.tolist(), top_tokens, prompt_tokens):
        if not all(p == p for p in row):  # NaN: the model's numbers broke down
            predictions.append(Prediction.failed("model returned NaN scores", method="score"))
            continue
        best = max(range(len(names)), key=row.__getitem__)
        predictions.append(Prediction(
            label=names[best], probabilities=dict(zip(names, row)),
            raw_text=tokenizer.decode([top]).strip(), method="score",
            prompt_tokens=int(n_in)))
    return predictions
