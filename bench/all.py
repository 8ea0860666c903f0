"""Every benchmark, one after the other, each in its own process; prints one
``name: value`` headline line per benchmark (the last line each script prints).

    python bench/all.py --quick     # all of them in under five minutes on 2 cores
    python bench/all.py             # the full sizes recorded in BENCHMARKS.md

Scripts and what they compare in the same run are described in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

#: script -> (headline names it prints, its arguments for --quick)
SCRIPTS = {
    "stamps.py": (["stamps_speedup"], ["--quick"]),
    "remote.py": (["remote_efficiency"], ["--quick"]),
    "local.py": (["local_speedup"], ["--quick"]),
    "gui.py": (["gui_max_stall_ms"], []),  # 500 rows already take seconds
    "scale.py": (["cached_rerun_calls", "peak_rss_ratio_100k_vs_10k"], ["--quick"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 5 minutes")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), QT_QPA_PLATFORM="offscreen")
    failed = 0
    start = time.perf_counter()
    for script, (names, quick_args) in SCRIPTS.items():
        cmd = [sys.executable, str(BENCH / script)] + (quick_args if args.quick else [])
        began = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines()
                     if ": " in line and line.split(": ", 1)[0] in names)
        for name in names:
            if proc.returncode == 0 and name in lines:
                print(f"{name}: {lines[name]}", flush=True)
            else:
                failed += 1
                print(f"{name}: FAILED ({script} exit {proc.returncode}: "
                      f"{proc.stderr.strip().splitlines()[-1:] or ''})", flush=True)
        print(f"  ({script}: {time.perf_counter() - began:.0f} s)", file=sys.stderr)
    print(f"  (all: {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
