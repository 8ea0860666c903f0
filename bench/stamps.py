"""Stamps ready for an HTTP engine (cut, stretch, PNG, base64): our pipeline against the
study's way, in the same run, plus peak memory at two catalog sizes.

    python bench/stamps.py            # 10,000 cutouts (study: 1,000), memory at 1k / 20k
    python bench/stamps.py --quick    # under a minute

The study's way (Tanoglidis & Jain 2024, paper.md "Per image: write a PNG, base64 it"):
per row one ``Cutout2D``, one ``matplotlib.pyplot.imsave`` to a PNG file, read the file
back and base64 it. Ours: ``ImageSource`` + ``iter_stamps(encode_png=True)``, base64 of
each ``Stamp.png``. The last line is ``stamps_speedup: <ours / study>``.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from glue_vlm.stamps import (CHUNK_ROWS, ImageSource, StampSettings, default_workers,
                             encode_png, iter_stamps, prepare_stamp)

IMAGE_SIDE = 4096
STAMP = 64


def make_image(side: int = IMAGE_SIDE, n_sources: int = 3000, seed: int = 0) -> np.ndarray:
    """float32 sky noise plus Gaussian sources, built in blocks (no big temporaries)."""
    rng = np.random.default_rng(seed)
    image = np.empty((side, side), np.float32)
    for start in range(0, side, 256):
        image[start:start + 256] = rng.normal(100.0, 5.0, (min(256, side - start), side))
    yy, xx = np.mgrid[-10:11, -10:11]
    for x0, y0, flux, sigma in zip(rng.integers(10, side - 10, n_sources),
                                   rng.integers(10, side - 10, n_sources),
                                   rng.lognormal(6, 1, n_sources),
                                   rng.uniform(1, 4, n_sources)):
        image[y0 - 10:y0 + 11, x0 - 10:x0 + 11] += (
            flux * np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))).astype(np.float32)
    return image


def positions(n: int, side: int = IMAGE_SIDE, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, side, n), rng.uniform(0, side, n)


def ours(image, x, y, workers: int, batch: int = 16, wait_s: float = 0.0) -> float:
    """Stamps per second through our pipeline, base64 included. With ``wait_s`` the
    consumer is an engine that waits that long per batch (an HTTP call): threads
    prepare while it waits; inline preparation adds up."""
    source = ImageSource(image, size=STAMP, x=x, y=y)
    settings = StampSettings(encode_png=True)
    start = time.perf_counter()
    count = 0
    for stamp in iter_stamps(source, range(len(x)), settings, workers=workers):
        base64.b64encode(stamp.png)
        count += 1
        if wait_s and count % batch == 0:
            time.sleep(wait_s)
    return count / (time.perf_counter() - start)


_SOURCE = None


def _chunk_pngs(rows) -> list[bytes]:
    """Process-pool worker: the same preparation, in a forked process."""
    settings = StampSettings()
    return [encode_png(prepare_stamp(_SOURCE.raw(int(r))[0], settings)[0]) for r in rows]


def ours_processes(image, x, y, workers: int) -> float:
    """The alternative measured against threads: forked processes over chunks
    (pool start-up included, as a run would pay it)."""
    global _SOURCE
    _SOURCE = ImageSource(image, size=STAMP, x=x, y=y)
    rows = np.arange(len(x))
    chunks = [rows[i:i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        count = 0
        for pngs in pool.map(_chunk_pngs, chunks):
            for png in pngs:
                base64.b64encode(png)
                count += 1
    return count / (time.perf_counter() - start)


def study(image, x, y) -> float:
    """Stamps per second the study's way: Cutout2D, plt.imsave to disk, read, base64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.nddata import Cutout2D

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        for i, (x0, y0) in enumerate(zip(x, y)):
            cutout = Cutout2D(image, (x0, y0), STAMP)
            path = os.path.join(folder, f"stamp_{i}.png")
            plt.imsave(path, cutout.data, cmap="gray", origin="lower")
            with open(path, "rb") as handle:
                base64.b64encode(handle.read())
        return len(x) / (time.perf_counter() - start)


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(n: int) -> None:
    """Run in a fresh process: peak RSS growth and peak traced allocations (MB) while
    streaming ``n`` stamps, RSS sampled every millisecond from a side thread."""
    image = make_image()
    x, y = positions(n)
    ours(image, x[:200], y[:200], default_workers())   # imports and caches warmed up
    gc.collect()
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tracemalloc.start()
    ours(image, x, y, default_workers())
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    done.set()
    sampler.join()
    print(f"{peak[0] - before:.1f} {traced_peak / 2 ** 20:.1f}")


def memory_growth(n: int) -> tuple[float, float]:
    """(peak RSS growth, peak traced allocations) in MB for ``n`` stamps."""
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(n)],
                         check=True, capture_output=True, text=True).stdout
    rss, traced = out.strip().splitlines()[-1].split()
    return float(rss), float(traced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller N (under a minute)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    n_ours, n_study, n_memory = ((2_000, 300, (1_000, 5_000)) if args.quick
                                 else (10_000, 1_000, (1_000, 20_000)))
    import astropy
    import PIL

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, numpy {np.__version__}, astropy "
          f"{astropy.__version__}, Pillow {PIL.__version__}; load average at start "
          f"{os.getloadavg()[0]:.2f}")
    image = make_image()
    x, y = positions(n_ours)
    ours(image, x[:200], y[:200], 0)                   # warm-up: imports, caches
    workers = default_workers()
    rates = {label: ours(image, x, y, w) for label, w in
             ((f"{workers} thread (default)", workers), ("2 threads", 2),
              ("inline (workers=0)", 0))}
    rates["2 forked processes"] = ours_processes(image, x, y, 2)
    rate_study = study(image, x[:n_study], y[:n_study])
    engine_rate = 16 / 0.008
    waiting = {w: ours(image, x, y, w, wait_s=0.008) for w in (1, 2, 0)}
    for label, rate in rates.items():
        print(f"ours, {label + ':':<22} {rate:7,.0f} stamps/s over {n_ours:,}")
    print(f"study (Cutout2D+imsave+file): {rate_study:7,.0f} stamps/s over {n_study:,}")
    print(f"with an engine that waits 8 ms per 16 stamps (alone: {engine_rate:,.0f}/s): "
          f"1 thread {waiting[1]:,.0f}, 2 threads {waiting[2]:,.0f}, "
          f"inline {waiting[0]:,.0f} stamps/s")
    for n in n_memory:
        rss, traced = memory_growth(n)
        print(f"memory, ours, N={n:,}: peak RSS growth {rss:.1f} MB, "
              f"peak traced allocations {traced:.1f} MB")
    rate_default = rates[f"{workers} thread (default)"]
    print(f"stamps_speedup: {rate_default / rate_study:.1f}")


if __name__ == "__main__":
    main()
