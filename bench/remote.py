"""Throughput of the OpenAI backend against a server with a fixed latency per request.

    PYTHONPATH=. python bench/remote.py [--n 1000] [--concurrency 16] [--latency 0.2]
                                        [--loop-rows 30] [--quick]

The server is the project's own OpenAI-compatible test server
(``glue_vlm.testing.openai_server``) in its own process on localhost, as a remote server
would be, answering every chat request after exactly ``--latency`` seconds. Two ways
to classify a cube of 64x64 colour stamps, timed in the same run:

- the real run path: ``glue_vlm.run.classify`` with a temporary result store and
  ``OpenAIBackend`` at ``--concurrency`` requests in flight. Its wall time is compared
  with the latency bound ceil(N / C) * L, the best any client can do with C requests in
  flight; ``remote_efficiency`` = bound / wall time.
- the study's loop (Tanoglidis & Jain 2024): one request at a time through the plain
  synchronous SDK, free-text answer, sleeping 3 s after every 10 images. It is timed on
  ``--loop-rows`` rows and compared as a rate.

The last line is ``remote_efficiency: <fraction>``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import math
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="rows through the run path")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="stamps per engine call (default: the backend's)")
    parser.add_argument("--loop-rows", type=int, default=30,
                        help="rows through the study's one-at-a-time loop")
    parser.add_argument("--quick", action="store_true",
                        help="200 rows and a 10-row loop (a check that it works)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.loop_rows = 200, 10
    if min(args.n, args.concurrency, args.loop_rows) < 1 or args.latency <= 0:
        parser.error("--n, --concurrency, --loop-rows and --latency must be positive")
    return args


def make_cube(n: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


MODEL = "test-vlm"


@contextlib.contextmanager
def test_server(latency: float):
    """The test server in a child process; yields its base URL."""
    from glue_vlm.testing.openai_server import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "glue_vlm.testing.openai_server",
                                "--port", str(port), "--latency", str(latency),
                                "--model", MODEL], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/models", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait()


def time_run_path(url: str, cube: np.ndarray, concurrency: int,
                  batch_size: int | None) -> tuple[float, int]:
    """Seconds for ``classify`` over the whole cube, and rows labelled."""
    from glue_vlm.backends.openai import OpenAIBackend
    from glue_vlm.run import classify
    from glue_vlm.stamps import CubeSource
    from glue_vlm.store import ResultStore
    from glue_vlm.tasks import PRESETS

    task = PRESETS["lsbg-vs-artifact"]
    with tempfile.TemporaryDirectory() as tmp:
        backend = OpenAIBackend(model=MODEL, base_url=url, concurrency=concurrency,
                                timeout=30, batch_size=batch_size)
        with backend, ResultStore(Path(tmp) / "bench.sqlite") as store:
            start = time.perf_counter()
            result = classify(CubeSource(cube), np.arange(len(cube)), task, backend,
                              store=store)
            wall = time.perf_counter() - start
    return wall, int((result.codes >= 0).sum())


def time_study_loop(url: str, cube: np.ndarray) -> float:
    """Seconds for the study's loop: one request at a time, 3 s pause every 10."""
    import openai

    from glue_vlm.stamps import encode_png
    from glue_vlm.tasks import PRESETS

    prompt = PRESETS["paper-lsbg"].prompt
    client = openai.OpenAI(base_url=url, api_key="none")
    start = time.perf_counter()
    for i, pixels in enumerate(cube):
        image = base64.b64encode(encode_png(pixels)).decode()
        client.chat.completions.create(model=MODEL, messages=[{
            "role": "user", "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}])
        if (i + 1) % 10 == 0:
            time.sleep(3)
    wall = time.perf_counter() - start
    client.close()
    return wall


def main(argv=None) -> None:
    args = parse_args(argv)
    n, c, latency = args.n, args.concurrency, args.latency
    bound = math.ceil(n / c) * latency
    with test_server(latency) as url:
        wall, labelled = time_run_path(url, make_cube(n), c, args.batch_size)
        loop_wall = time_study_loop(url, make_cube(args.loop_rows))
    loop_rate = args.loop_rows / loop_wall
    rate = n / wall
    print(f"server latency {latency * 1000:.0f} ms per request; run path: N={n}, C={c}")
    print(f"run path: {wall:.2f} s for {n} rows ({labelled} labelled), {rate:.1f} rows/s")
    print(f"latency bound ceil(N/C)*L: {bound:.2f} s, {n / bound:.1f} rows/s")
    print(f"study loop (1 at a time, 3 s pause per 10): {loop_wall:.2f} s for "
          f"{args.loop_rows} rows, {loop_rate:.2f} rows/s")
    print(f"speed-up over the study loop: {rate / loop_rate:.0f}x")
    print(f"remote_efficiency: {bound / wall:.3f}")


if __name__ == "__main__":
    main()
