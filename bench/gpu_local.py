"""Scoring throughput of a full-size LLaVA-NeXT-7B (v1.6 Mistral) on one CUDA GPU.

    PYTHONPATH=. python bench/gpu_local.py [--batch-sizes 1,2,4,8,16,32,64] [--batches 3]

Nothing is downloaded: the model is built from its configuration (written out below,
as published for llava-hf/llava-v1.6-mistral-7b-hf) with random bf16 weights
initialised directly on the GPU, and the tiny test tokenizer stands in for Mistral's
(it spends a few percent fewer tokens on the prompts; the 1,176 image tokens of a
336-px stamp dominate either way). The model is handed to ``LocalBackend`` through its
model cache, so the timed path is the backend's own: chat template, image processor,
left padding, one forward pass, option scores.

For each batch size it prints images/s end to end (``LocalBackend.predict``,
preprocessing included) and for the forward pass alone, tokens per image, and the
achieved TFLOP/s of the forward pass, estimated as 2 x parameters x tokens (language
model without embeddings and output head, which runs on one position only, plus the
vision tower on its own tokens; attention's quadratic term is left out, so the figure
is a slight underestimate).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
STAMP_SIZE = 336


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)),
                        type=lambda text: [int(b) for b in text.split(",") if b.strip()],
                        help="comma-separated batch sizes (default 1,...,64)")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per size")
    parser.add_argument("--size", type=int, default=STAMP_SIZE, help="stamp side in px")
    parser.add_argument("--task", default="paper-morphology")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: a CPU "
                        "run with --text-layers 1 only checks that the script works")
    parser.add_argument("--text-layers", type=int, default=32,
                        help="language-model layers (32 in the real model)")
    args = parser.parse_args(argv)
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.batches < 1:
        parser.error("batch sizes and --batches must be positive")
    return args


def llava_next_7b_config(image_token_index: int, text_layers: int = 32):
    """The configuration of llava-hf/llava-v1.6-mistral-7b-hf."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    text = MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=text_layers, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)
    return LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_index,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=576, tie_word_embeddings=False)


def forward_flops(lm_params: int, lm_tokens: int, vision_params: int,
                  vision_tokens: int) -> float:
    """Matrix-multiply FLOPs of one forward pass: 2 per parameter per token."""
    return 2.0 * (lm_params * lm_tokens + vision_params * vision_tokens)


def parameter_counts(model) -> tuple[int, int]:
    """(language model + projector parameters applied to every token, vision tower
    parameters); embeddings and the output head are left out."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    skipped = (model.get_input_embeddings().weight.numel()
               + model.get_output_embeddings().weight.numel())
    return total - vision - skipped, vision


def vision_tokens_per_image(pixel_values, config) -> int:
    """Tokens through the vision tower for one image: crops x (patches + CLS)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return int(pixel_values.shape[1]) * (side * side + 1)


def build(processor_dir: str, device: str, text_layers: int):
    """Random LLaVA-NeXT-7B built on ``device`` (bf16 on CUDA, float32 on the CPU); its
    config and processor are saved in ``processor_dir`` for the backend to check."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from glue_vlm.testing.tiny_llava import build_processor

    processor = build_processor(image_size=336, patch_size=14)
    config = llava_next_7b_config(processor.tokenizer.convert_tokens_to_ids("<image>"),
                                  text_layers)
    config.save_pretrained(processor_dir)
    processor.save_pretrained(processor_dir)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation="sdpa").eval()
    return processor, model


class DeviceClock:
    """Synchronisation and peak memory on CUDA; no-ops on the CPU."""

    def __init__(self, device: str):
        import torch

        self.cuda = torch.cuda if device == "cuda" else None

    def sync(self) -> None:
        if self.cuda:
            self.cuda.synchronize()

    def reset(self) -> None:
        if self.cuda:
            self.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return self.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_local: no CUDA GPU is visible to PyTorch: run this on a machine with "
              "one (bench/local.py is the CPU benchmark)", file=sys.stderr)
        return 1
    from glue_vlm.backends import local
    from glue_vlm.stamps import Stamp
    from glue_vlm.tasks import get_task

    task = get_task(args.task)
    rng = np.random.default_rng(0)
    clock = DeviceClock(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        processor, model = build(tmp, args.device, args.text_layers)
        lm_params, vision_params = parameter_counts(model)
        where = torch.cuda.get_device_name() if args.device == "cuda" else "the CPU"
        print(f"LLaVA-NeXT-7B (random {model.dtype}, {args.text_layers} text layers) built "
              f"in {time.perf_counter() - start:.0f} s on {where}: {lm_params / 1e9:.2f} B language-model "
              f"and {vision_params / 1e9:.2f} B vision parameters; task {task.slug}, "
              f"{args.size}-px stamps")
        print(f"{'batch':>5} {'images/s':>9} {'fwd images/s':>12} {'tokens/img':>10} "
              f"{'TFLOP/s':>8} {'peak GiB':>8}")
        for batch_size in args.batch_sizes:
            backend = local.LocalBackend(tmp, device=args.device, batch_size=batch_size)
            with local._LOCK:
                local._MODELS[backend.load_key] = local.LoadedModel(processor, model,
                                                                    args.device)
            stamps = [Stamp(index=i, row=i, pixels=rng.integers(
                0, 256, (args.size, args.size, 3), dtype=np.uint8))
                for i in range(batch_size * args.batches)]
            clock.reset()
            backend.predict(stamps[:batch_size], task)  # warm-up
            if backend.batch_size != batch_size:
                print(f"{batch_size:>5} out of memory (the backend fell back to "
                      f"{backend.batch_size})")
                break
            clock.sync()
            start = time.perf_counter()
            predictions = backend.predict(stamps, task)
            clock.sync()
            end_to_end = len(stamps) / (time.perf_counter() - start)
            failed = sum(not p.ok for p in predictions)

            inputs = backend._encode(processor, [s.pixels for s in stamps[:batch_size]],
                                     task).to(args.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                model(**inputs, logits_to_keep=1, use_cache=False)
                clock.sync()
                start = time.perf_counter()
                for _ in range(args.batches):
                    model(**inputs, logits_to_keep=1, use_cache=False)
                clock.sync()
            seconds = (time.perf_counter() - start) / args.batches
            lm_tokens = int(inputs["attention_mask"].sum())
            vision_tokens = batch_size * vision_tokens_per_image(inputs["pixel_values"],
                                                                 model.config)
            tflops = forward_flops(lm_params, lm_tokens, vision_params, vision_tokens)
            print(f"{batch_size:>5} {end_to_end:>9.1f} {batch_size / seconds:>12.1f} "
                  f"{lm_tokens // batch_size:>10} {tflops / seconds / 1e12:>8.1f} "
                  f"{clock.peak_gib():>8.1f}"
                  + (f"  ({failed} rows failed)" if failed else ""))
            backend.close()
    local.release_models()
    return 0


if __name__ == "__main__":
    sys.exit(main())
