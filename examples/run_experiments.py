"""Run the long-term-dependency experiments: LSTM and GRU, plain, with temporal wormholes, and with
wormholes + SAL, at a matched parameter budget.

    python examples/run_experiments.py --task adding --T 100 --steps 300
    python examples/run_experiments.py --task copy --T 100 --steps 300
    python examples/run_experiments.py --task digits_rows --steps 300
    python examples/run_experiments.py --task digits_pixels --steps 200 --variants lstm gru lstm+wh

Writes ``--out/<task>/results.csv``, ``results.json``, ``per_sample.csv`` and
``iterations_vs_difficulty.png``, and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import EXPERIMENT_WORMHOLES as W, VARIANTS, RunConfig, run_task  # noqa: E402
from tasks import TASKS, make_task  # noqa: E402



def markdown_table(rows: list) -> str:
    """The result rows as a Markdown table (the layout docs/benchmarks.md uses)."""
    head = ["variant", "hidden", "params", rows[0]["metric_name"], "train loss first -> last", "ms/step",
            "s/epoch", "fwd it (test)", "bwd it (train)", "r(difficulty, it)", "rho"]
    fmt = lambda v, p=2: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        metric = fmt(r["test_metric"], 4) + (f" (recall acc {r['recall_acc']:.3f})" if r.get("recall_acc") is not None else "")
        lines.append("| " + " | ".join([
            r["variant"], str(r["hidden"]), f"{r['params']} ({100 * r['params_vs_budget']:+.1f}%)", metric,
            f"{r['first_train_loss']:.3f} -> {r['final_train_loss']:.3f}", f"{r['ms_per_step']:.0f}",
            f"{r['s_per_epoch']:.1f}", fmt(r["fwd_iters_test"]), fmt(r["bwd_iters_train"]),
            fmt(r["r_difficulty"]), fmt(r["rho_difficulty"])]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--T", type=int, default=100, help="sequence length / delay (adding, copy)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hidden", type=int, default=32, help="hidden size of the plain LSTM (sets the budget)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--n-test", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sal-eta", type=float, default=1e-3)
    p.add_argument("--gate", default=W.gate, choices=("scalar", "channel", "input"))
    p.add_argument("--gate-init", type=float, default=W.gate_init)
    p.add_argument("--proj-std", type=float, default=W.proj_std)
    p.add_argument("--tol", type=float, default=W.solver.tol)
    p.add_argument("--max-iter", type=int, default=W.solver.max_iter)
    p.add_argument("--solver", default=W.solver.name)
    p.add_argument("--out", default="experiments_out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    wormholes = replace(W, gate=a.gate, gate_init=a.gate_init, proj_std=a.proj_std,
                        solver=a.solver, tol=a.tol, max_iter=a.max_iter)
    cfg = RunConfig(steps=a.steps, batch=a.batch, lr=a.lr, hidden=a.hidden, layers=a.layers,
                    eval_every=min(a.eval_every, a.steps), n_test=a.n_test, seed=a.seed, threads=a.threads,
                    sal_eta=a.sal_eta, wormholes=wormholes, progress=not a.no_progress)
    task = make_task(a.task, T=a.T, seed=a.seed)
    rows = run_task(task, a.variants, cfg, Path(a.out))
    print(f"\n{task.tag()}: baseline {task.baseline_note}; difficulty = {task.difficulty_name}")
    print(f"command: python examples/run_experiments.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
