"""``make gpu-check``: the GPU-marked tests, then issue 19's benchmark table on the GPU (< 8 min).

    python bench/gpu_check.py [--rounds 5] [--budget 450]

Exits 2 without CUDA (nothing to check). Each stage runs in its own process with a deadline, so a
hang cannot eat the budget; the table is printed as the bench prints it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, timeout):
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
        print(f"gpu-check: {' '.join(cmd[1:4])} timed out after {timeout:.0f} s", flush=True)
    return rc, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for both stages together")
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    print(f"gpu-check on {torch.cuda.get_device_name()} (torch {torch.__version__})", flush=True)
    env_py = sys.executable
    rc_tests, spent = run([env_py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                          timeout=args.budget * 0.5)
    rc_bench, _ = run([env_py, "bench/bench_runtime.py", "--device", "cuda", "--rounds", str(args.rounds),
                       "--only", "overhead,halting,anderson,compile"], timeout=max(60.0, args.budget - spent))
    print(f"gpu-check: tests {'passed' if rc_tests == 0 else f'FAILED (rc {rc_tests})'}, "
          f"bench {'done' if rc_bench == 0 else f'FAILED (rc {rc_bench})'}")
    return 0 if rc_tests == 0 and rc_bench == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
