"""Scale: a large catalog classified from the CLI through the project's OpenAI-compatible
test server on localhost, against a 10x smaller one in the same run. Catalogs are read
and written as FITS (astropy's ECSV writer alone holds ~700 bytes a row at its peak).

Reports, per size, the CLI process's peak memory (RssAnon: what the process allocated;
VmHWM also counts the memory-mapped stamp cube's pages, which are the OS file cache), the
wall time, then a fully cached rerun of the large catalog: its engine calls (requests
the server saw; must be 0) and store lookups per second.

    python bench/scale.py            # 10,000 vs 100,000 rows
    python bench/scale.py --quick    # 2,000 vs 20,000 rows

Last lines: ``cached_rerun_calls: N`` and ``peak_rss_ratio_100k_vs_10k: R`` (in --quick
mode the ratio is of the quick sizes, 20k vs 2k).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from astropy.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glue_vlm.store import ResultStore  # noqa: E402
from glue_vlm.testing.openai_server import DEFAULT_MODEL, OpenAITestServer  # noqa: E402

TASK = "lsbg-vs-artifact"
STAMP = 16


def write_catalog(folder: Path, n: int, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    cube = np.lib.format.open_memmap(folder / f"cube{n}.npy", mode="w+", dtype=np.uint8,
                                     shape=(n, STAMP, STAMP, 3))
    for start in range(0, n, 10_000):  # distinct stamps, written in slices
        stop = min(n, start + 10_000)
        cube[start:stop] = rng.integers(0, 256, (stop - start, STAMP, STAMP, 3),
                                        dtype=np.uint8)
    cube.flush()
    del cube
    Table({"id": np.arange(n)}).write(folder / f"cat{n}.fits")
    return folder / f"cat{n}.fits", folder / f"cube{n}.npy"


def status_kb(pid: int) -> dict[str, int]:
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "RssAnon"):
                fields[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return fields


def run_cli(catalog: Path, cube: Path, store: Path, url: str, out: Path) -> dict:
    """Run ``glue-vlm classify``; sample its memory until it ends."""
    cmd = [sys.executable, "-m", "glue_vlm.cli", "classify", str(catalog), "--task", TASK,
           "--stamps", str(cube), "--backend", "openai", "--model", DEFAULT_MODEL,
           "--base-url", url, "--concurrency", "32", "--store", str(store),
           "-o", str(out), "--overwrite"]
    env = dict(os.environ, OPENAI_API_KEY="sk-bench-not-a-real-key")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak = {"VmHWM": 0, "RssAnon": 0}
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        for name, value in status_kb(proc.pid).items():
            peak[name] = max(peak[name], value)
        time.sleep(0.05)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"CLI failed ({proc.returncode}):\n{errors[0][-2000:]}")
    return {"seconds": time.perf_counter() - start, "vmhwm_mb": peak["VmHWM"] / 1024,
            "rss_anon_mb": peak["RssAnon"] / 1024}


def store_lookup_rate(store_path: Path, n: int) -> float:
    """Lookups per second of ``n`` keys in the filled store (what a cached rerun does)."""
    with ResultStore(store_path) as store:
        keys = [row[0] for row in store._db.execute("SELECT key FROM results LIMIT ?", (n,))]
        start = time.perf_counter()
        for begin in range(0, len(keys), 64):
            store.get_many(keys[begin:begin + 64])
        return len(keys) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k vs 20k rows")
    args = parser.parse_args()
    small, large = (2_000, 20_000) if args.quick else (10_000, 100_000)

    with tempfile.TemporaryDirectory() as tmp, OpenAITestServer() as server:
        folder = Path(tmp)
        results = {}
        for n in (small, large):
            catalog, cube = write_catalog(folder, n, seed=n)
            store = folder / f"store{n}.sqlite"
            results[n] = run_cli(catalog, cube, store, server.base_url, folder / f"out{n}.fits")
            print(f"{n:>7} rows: {results[n]['seconds']:.1f} s, "
                  f"{n / results[n]['seconds']:.0f} rows/s, peak RssAnon "
                  f"{results[n]['rss_anon_mb']:.0f} MB, VmHWM {results[n]['vmhwm_mb']:.0f} MB",
                  flush=True)
        before = len(server.chat_requests())
        rerun = run_cli(catalog, cube, store, server.base_url, folder / "rerun.fits")
        calls = len(server.chat_requests()) - before
        rate = store_lookup_rate(store, large)
        print(f"cached rerun of {large} rows: {rerun['seconds']:.1f} s "
              f"({large / rerun['seconds']:.0f} rows/s end to end), engine calls {calls}, "
              f"store lookups {rate:,.0f}/s (batches of 64)")
    ratio = results[large]["rss_anon_mb"] / results[small]["rss_anon_mb"]
    hwm_ratio = results[large]["vmhwm_mb"] / results[small]["vmhwm_mb"]
    print(f"peak memory {large} vs {small} rows: RssAnon x{ratio:.2f}, VmHWM x{hwm_ratio:.2f}")
    print(f"cached_rerun_calls: {calls}")
    print(f"peak_rss_ratio_100k_vs_10k: {ratio:.2f}")


if __name__ == "__main__":
    main()
