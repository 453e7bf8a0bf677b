"""Regenerate the measured tables behind docs/benchmarks.md by running the bench scripts.

Each bench script prints its own tables; this runner executes them one after another (a fresh
process each, ``torch`` pinned to the thread count the script asks for), and writes their output,
headed by the exact command, to one Markdown file.

    python bench/make_benchmarks_table.py                 # full settings (tens of minutes on 2 cores)
    python bench/make_benchmarks_table.py --quick         # smaller settings (a few minutes)
    python bench/make_benchmarks_table.py --only bench_wormhole.py --out /tmp/b.md
    python bench/make_benchmarks_table.py --quick --examples   # also the short experiment configs
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# script -> (full arguments, quick arguments)
BENCHES = {
    "bench_wormhole.py": (["--repeats", "30"], ["--repeats", "5"]),
    "bench_fixed_point.py": (["--threads", "1"], ["--threads", "1", "--batch", "256", "--width", "256"]),
    "bench_vs_torchdeq.py": (["--rounds", "21", "--threads", "1"], ["--rounds", "5", "--threads", "1"]),
    "bench_recurrent.py": (["--repeats", "5", "--threads", "1"], ["--repeats", "2", "--threads", "1", "--lengths", "50"]),
    "bench_sal_overhead.py": (["--reps", "30"], ["--reps", "5"]),
}

# the experiments' short configurations (examples/run_experiments.py)
EXAMPLES = [
    ["--task", "digits_rows", "--steps", "60", "--variants", "lstm", "gru", "lstm+wh", "lstm+wh+sal"],
    ["--task", "adding", "--T", "50", "--steps", "20", "--batch", "32", "--n-test", "128", "--variants", "lstm", "gru", "lstm+wh"],
]


def run(cmd: list, timeout: float) -> tuple[str, float, int]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + (f"\n[stderr tail]\n{proc.stderr[-2000:]}" if proc.returncode else ""), proc.returncode
    except subprocess.TimeoutExpired:
        out, rc = f"timed out after {timeout:.0f} s", 124
    return out.strip(), time.perf_counter() - t0, rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller settings (minutes, noisier)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these scripts")
    ap.add_argument("--examples", action="store_true", help="also run the short experiment configurations")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.md"), help="Markdown file to write")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    a = ap.parse_args(argv)
    sections = [f"# Benchmark results ({'quick' if a.quick else 'full'} settings)\n",
                f"Python {platform.python_version()}, {platform.machine()}, generated {time.strftime('%Y-%m-%d %H:%M')} "
                f"by `python bench/make_benchmarks_table.py{' --quick' if a.quick else ''}`.\n"]
    failed = 0
    jobs = [(f"bench/{name}", [sys.executable, f"bench/{name}", *BENCHES[name][1 if a.quick else 0]])
            for name in (a.only or BENCHES)]
    if a.examples:
        jobs += [("examples/run_experiments.py", [sys.executable, "examples/run_experiments.py", *args, "--no-progress",
                                                  "--out", "experiments_out"]) for args in EXAMPLES]
    for title, cmd in jobs:
        shown = " ".join(["python", *cmd[1:]])
        print(f"running: {shown}", file=sys.stderr, flush=True)
        out, seconds, rc = run(cmd, a.timeout)
        failed += rc != 0
        body = out if "|---" in out else f"```\n{out}\n```"  # plain-text tables read better fenced
        sections.append(f"## {title}\n\n`{shown}` ({seconds:.0f} s{', FAILED rc=%d' % rc if rc else ''})\n\n{body}\n")
    Path(a.out).write_text("\n".join(sections))
    print(f"wrote {a.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
