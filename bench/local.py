"""Local backend throughput: scoring in batches vs generation one image at a time (the
study's way) vs generation in batches, in one run on the same stamps.

    python bench/local.py [--quick] [--model DIR] [--device cpu] [--n 64]

Without ``--model`` it builds the tiny random LLaVA-NeXT (glue_vlm.testing.tiny_llava),
so the numbers measure the pipeline (processor, padding, forward passes, decoding), not
a real model. Generation runs ``--max-new-tokens`` greedy steps in both generation
rows (a random model rarely stops early); the study's second GPT-4o call per image to
read the free text is not counted. The three ways take turns for ``--rounds`` rounds and
each keeps its best round, so a burst of load from other jobs on a shared machine does
not land on one way only. The last line is ``local_speedup: <scoring batched
images/s divided by generation one at a time images/s>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from glue_vlm.backends.local import LocalBackend, release_models
from glue_vlm.stamps import Stamp
from glue_vlm.tasks import get_task


def make_stamps(n: int, size: int, seed: int = 0) -> list[Stamp]:
    rng = np.random.default_rng(seed)
    return [Stamp(index=i, row=i, pixels=rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for i in range(n)]


def images_per_second(backend: LocalBackend, stamps: list[Stamp], task, per_call: int) -> float:
    backend.predict(stamps[:per_call], task)  # warm-up: first-call allocations
    start = time.perf_counter()
    for begin in range(0, len(stamps), per_call):
        predictions = backend.predict(stamps[begin:begin + per_call], task)
        assert len(predictions) == len(stamps[begin:begin + per_call])
    return len(stamps) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="16 stamps and 2 rounds instead of 64 and 5")
    parser.add_argument("--rounds", type=int, help="rounds; each way keeps its best")
    parser.add_argument("--model", help="model id or directory (default: tiny random)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, help="number of stamps")
    parser.add_argument("--size", type=int, default=64, help="stamp side (the study: 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--task", default="paper-morphology")
    args = parser.parse_args(argv)
    n = args.n or (16 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 5)
    task = get_task(args.task)
    stamps = make_stamps(n, args.size)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from glue_vlm.testing.tiny_llava import build_tiny_llava_next

            model = str(build_tiny_llava_next(tmp))
        common = {"model": model, "device": args.device}
        runs = [
            ("scoring, batched", LocalBackend(**common, mode="score",
                                              batch_size=args.batch_size), args.batch_size),
            ("generation, one at a time (study)", LocalBackend(
                **common, mode="generate", batch_size=1,
                max_new_tokens=args.max_new_tokens), 1),
            ("generation, batched", LocalBackend(
                **common, mode="generate", batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens), args.batch_size),
        ]
        print(f"model {model if args.model else 'tiny random LLaVA-NeXT'} on "
              f"{runs[0][1].device} ({runs[0][1].dtype}), task {task.slug}, {n} stamps of "
              f"{args.size} px, batch {args.batch_size}, max_new_tokens "
              f"{args.max_new_tokens}, best of {rounds} rounds")
        rates = {label: 0.0 for label, _, _ in runs}
        for _ in range(rounds):
            for label, backend, per_call in runs:
                rate = images_per_second(backend, stamps, task, per_call)
                rates[label] = max(rates[label], rate)
        for label in rates:
            print(f"  {label:36s} {rates[label]:8.1f} images/s")
        release_models()
    speedup = rates["scoring, batched"] / rates["generation, one at a time (study)"]
    print(f"  batched generation vs one at a time: "
          f"{rates['generation, batched'] / rates['generation, one at a time (study)']:.1f}x")
    print(f"local_speedup: {speedup:.1f}")


if __name__ == "__main__":
    main()
