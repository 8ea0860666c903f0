"""A tiny random LLaVA-NeXT, built offline and saved with ``save_pretrained``.

The directory it writes loads through the same path users take with real weights
(``AutoProcessor.from_pretrained`` + ``AutoModelForImageTextToText.from_pretrained``,
with ``HF_HUB_OFFLINE=1``) and can be served by ``transformers serve``. It has the
structure of ``llava-hf/llava-v1.6-mistral-7b-hf`` at toy size: a CLIP vision tower, a
Mistral text model, a sentencepiece-style BPE tokenizer (``▁`` marks a leading space,
byte fallback for any text), the LLaVA-NeXT image processor with any-resolution
patching, and the Mistral v1.6 chat template ``[INST] <image>\\n{prompt} [/INST]``.
The weights are random: answers are meaningless but deterministic for a given seed.

Command line: ``python -m glue_vlm.testing.tiny_llava DIR [--seed N]``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

__all__ = ["build_tiny_llava_next", "build_processor", "CHAT_TEMPLATE", "IMAGE_SIZE"]

#: side of one vision-tower crop (the real model: 336)
IMAGE_SIZE = 32
PATCH_SIZE = 8
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
VOCAB_SIZE = 1024
#: bump when anything below changes, so cached directories are rebuilt
BUILD_VERSION = 1

#: the Mistral-based LLaVA v1.6 format; accepts content as a string or as typed blocks
#: ("image" blocks as the processor and ``transformers serve`` pass them)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}"
    "{% set blocks = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set blocks = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' }}{% for b in blocks if b['type'] == 'text' %}{{ b['text'] }}{% endfor %}"
    "{{ '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{% for b in blocks if b['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for b in blocks if b['type'] == 'text' %}{{ b['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' }}{% for b in blocks if b['type'] == 'text' %}{{ b['text'] }}{% endfor %}"
    "{{ '</s>' }}"
    "{% else %}{{ raise_exception('Only system, user and assistant roles are supported') }}"
    "{% endif %}{% endfor %}"
)


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: every preset prompt and label, option keys
    with and without a leading space, and the chat-template markers."""
    from ..tasks import PRESETS

    lines = ["[INST] [/INST] <<SYS>> <</SYS>>", "Answer: A. The answer is B. Category 0"]
    for task in PRESETS.values():
        lines.append(task.render_prompt())
        lines.append(" ".join(task.label_names))
        lines += [f"{lab.name}: {lab.description}" for lab in task.labels]
    keys = list(string.ascii_uppercase) + list(string.digits)
    lines += [" ".join(keys)] * 20  # makes "▁A" ... "▁9" tokens besides "A" ... "9"
    return lines


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = list(string.ascii_letters + string.digits + string.punctuation) + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 256, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, show_progress=False)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    draft.train_from_iterator(_corpus(), trainer=trainer)
    vocab = draft.get_vocab()
    merges = json.loads(draft.to_str())["model"]["merges"]
    for byte in range(256):  # byte fallback: any character still encodes
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    model = models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else
                                            tuple(m.split(" ")) for m in merges],
                       unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


def build_processor(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    """A LLaVA-NeXT processor with the tiny tokenizer, the any-resolution image
    processor for crops of ``image_size`` (grid pinpoints as in v1.6: 1x2, 2x1, 2x2 and,
    at full size, 1x3 and 3x1 crops) and the Mistral v1.6 chat template."""
    from transformers import (LlavaNextImageProcessorPil, LlavaNextProcessor,
                              PreTrainedTokenizerFast)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer(), bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", padding_side="left",
        extra_special_tokens={"image_token": "<image>"})
    grid = [[1, 2], [2, 1], [2, 2]] + ([[3, 1], [1, 3]] if image_size >= 336 else [])
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[[h * image_size, w * image_size] for h, w in grid])
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)


def _build(path: Path, seed: int) -> None:
    import torch
    from transformers import (CLIPVisionConfig, GenerationConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, MistralConfig)

    processor = build_processor()
    tokenizer = processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE,
                              patch_size=PATCH_SIZE, projection_dim=32)
    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, sliding_window=None,
                         bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                         pad_token_id=ids["<pad>"])
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_index=ids["<image>"],
                             image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
                             vision_feature_select_strategy="default",
                             vision_feature_layer=-2,
                             image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # leave the global seed be
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config).eval()
        for param in model.parameters():  # larger than the default init, so that
            if param.dim() > 1:           # answers depend on the input
                param.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        do_sample=False, max_new_tokens=20)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def build_tiny_llava_next(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model into ``path`` (created if needed) and return it. A directory
    already built with the same seed and version is reused as is."""
    path = Path(path)
    stamp = path / "glue_vlm_tiny.json"
    want = {"seed": seed, "version": BUILD_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return path
    path.mkdir(parents=True, exist_ok=True)
    _build(path, seed)
    stamp.write_text(json.dumps(want))
    return path


if __name__ == "__main__":  # pragma: no cover
    import argparse

    parser = argparse.ArgumentParser(description="Build a tiny random LLaVA-NeXT.")
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_llava_next(args.path, args.seed))
