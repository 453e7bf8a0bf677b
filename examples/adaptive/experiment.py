"""Adaptive depth on binary addition: plain, weight-tied fixed depth, wormhole without and with a
compute cost (issue 17, "Done when" item 3). One seeded script: a table on stdout, a plot and the
raw results in ``--out``.

Models (``models.py``): a 3-layer convolutional adder (``embed -> conv1 -> conv2 -> head``,
kernel 3, 32 channels); ``tied K`` runs its ``conv1 -> conv2`` cycle K times with a gated
feedback (backprop through the unroll); ``worm`` is the plain model after
``fxwormhole.transform(..., WormholeConfig(wormholes=[("conv2", "conv1")], gate="input", ...))``,
trained with the contraction regulariser (``lam_jac``, needed for stability), gradient clipping and
an adjoint tolerance of 1e-3, without and with the compute cost ``lam_first * ||T(0)|| / ||x||``
(the feedback injected after the first evaluation, per sample; see ``probe.py``) at several
weights, which traces the compute/accuracy curve.

Test sets: ``strat`` holds 100 samples at every level 0..11 of the longest propagating run; ``nat``
holds 2000 uniformly random additions (the distribution of real inputs: long runs are rare).
Iterations are body evaluations per sample as the library counts them (``fixed_point_stats``); a
tied model spends K. Timing: one process, variants alternating, 1 thread, medians.

    python examples/adaptive/experiment.py --out adaptive_out            # about 25 min on 2 free cores
    python examples/adaptive/experiment.py --quick --out /tmp/adaptive   # about 2 min
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from train import EPOCH_STEPS, Run, Trainer, train
from tasks import Addition

#: The wormhole settings every ``worm`` run shares (the recommended recipe, see docs/adaptive_depth.md).
WORM = Run(variant="worm", steps=1000, lam_jac=1.0, clip=1.0, tol=1e-2, max_iter=30, grad_tol=1e-3)


def variants(quick: bool) -> list[Run]:
    tied_steps = 600 if quick else 3000
    worm_steps = 150 if quick else WORM.steps
    runs = [Run(variant="plain", steps=tied_steps)]
    runs += [Run(variant="tied", K=k, steps=tied_steps) for k in ((3, 5) if quick else (2, 3, 4, 5, 6))]
    costs = (0.0, 1.0) if quick else (0.0, 0.1, 0.3, 1.0)
    runs += [replace(WORM, steps=worm_steps, lam_first=lam) for lam in costs]
    return runs


def _train(run: Run) -> dict:
    torch.set_num_threads(1)
    return train(run)


def time_variants(runs: list[Run], models: Path, rounds: int, batch: int = 64, steps: int = 10) -> dict:
    """Median seconds of one training epoch (``EPOCH_STEPS`` steps, from the median of ``steps``
    timed steps per round) and of inference on the natural test set, per variant: the seed-0
    models trained above, variants alternating round by round in this process, 1 thread."""
    torch.set_num_threads(1)
    task = Addition(runs[0].bits)
    x, y, _ = task.natural(2000, np.random.default_rng(20_000))
    trainers = {}
    for r in runs:
        t = Trainer(r, task, x[:4])
        t.net.load_state_dict(torch.load(models / f"{slug(r)}.pt"))
        trainers[r.label()] = t
    infer = {k: [] for k in trainers}
    step_s = {k: [] for k in trainers}
    rng = np.random.default_rng(0)
    for _ in range(rounds):  # inference first: the timed training steps below change the weights
        for label, t in trainers.items():
            t.net.eval()
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(0, len(y), batch):
                    t.net(x[i:i + batch])
            infer[label].append(time.perf_counter() - t0)
    for _ in range(rounds):
        for label, t in trainers.items():
            for _ in range(steps):
                xb, yb, _ = task.sample(batch, rng)
                t0 = time.perf_counter()
                t.step(xb, yb)
                step_s[label].append(time.perf_counter() - t0)
    return {k: {"infer_s": statistics.median(infer[k]), "epoch_s": EPOCH_STEPS * statistics.median(step_s[k])} for k in trainers}


def slug(run: Run) -> str:
    return run.label().replace(" ", "_").replace("=", "")


def summarise(results: list[dict]) -> list[dict]:
    rows = {}
    for r in results:
        rows.setdefault(r["label"], []).append(r)
    out = []
    for label, rs in rows.items():
        mean = lambda key: float(np.mean([r[key] for r in rs]))
        out.append({"label": label, "seeds": [r["seed"] for r in rs], "acc": mean("acc"), "acc_seeds": [r["acc"] for r in rs],
                    "nat_acc": mean("nat_acc"), "nat_acc_seeds": [r["nat_acc"] for r in rs],
                    "it": mean("it_mean"), "nat_it": mean("nat_it"), "rho": mean("rho"), "rho_seeds": [r["rho"] for r in rs],
                    "rho_carry": mean("rho_carry"), "nat_rho_carry": mean("nat_rho_carry"),
                    "acc_lvl": np.mean([r["acc_lvl"] for r in rs], 0).tolist(), "it_lvl": np.mean([r["it_lvl"] for r in rs], 0).tolist(),
                    "s_per_epoch": mean("s_per_epoch"), "bad_steps": sum(r["bad_steps"] for r in rs),
                    "bad_backward_steps": sum(r["bad_backward_steps"] for r in rs)})
    return out


def matched(rows: list[dict], key: str) -> dict:
    """For each wormhole row: the smallest fixed K (plain = 1) within 1 point of its accuracy on
    ``key`` (acc / nat_acc), and the ratio of its mean iterations to that K."""
    fixed = sorted(((1 if r["label"] == "plain" else int(r["label"].split("=")[1]), r) for r in rows
                    if r["label"] == "plain" or r["label"].startswith("tied")), key=lambda t: t[0])
    it_key = "it" if key == "acc" else "nat_it"
    out = {}
    for r in rows:
        if not r["label"].startswith("worm"):
            continue
        K = next((k for k, f in fixed if f[key] >= r[key] - 0.01), None)
        out[r["label"]] = (K, r[it_key] / K if K else float("nan"))
    return out


def table(rows: list[dict], times: dict) -> str:
    head = ("| variant | seeds | acc strat % (per seed) | acc nat % | mean it strat | mean it nat | rho(run) per seed | "
            "rho(carry) | s/epoch (train) | inference s (nat, 2000) | non-converged steps fwd/bwd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {100 * r['acc']:.1f} ({'/'.join(f'{100 * a:.1f}' for a in r['acc_seeds'])}) | "
                     f"{100 * r['nat_acc']:.1f} | {r['it']:.2f} | {r['nat_it']:.2f} | "
                     f"{'/'.join(f'{v:.2f}' for v in r['rho_seeds']) if r['label'].startswith('worm') else '-'} | "
                     f"{r['rho_carry']:.2f} | {times[r['label']]['epoch_s']:.2f} | {times[r['label']]['infer_s']:.3f} | "
                     f"{r['bad_steps']}/{r['bad_backward_steps']} |")
    lines.append("")
    lines.append("| level (longest run) | " + " | ".join(str(l) for l in range(len(rows[0]["acc_lvl"]))) + " |")
    lines.append("|---|" + "---|" * len(rows[0]["acc_lvl"]))
    for r in rows:
        lines.append(f"| acc {r['label']} | " + " | ".join(f"{100 * a:.0f}" for a in r["acc_lvl"]) + " |")
    for r in rows:
        if r["label"].startswith("worm"):
            lines.append(f"| it {r['label']} | " + " | ".join(f"{a:.1f}" for a in r["it_lvl"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from fxwormhole.demo import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    levels = np.arange(len(rows[0]["acc_lvl"]))
    for r in rows:
        style = "-o" if r["label"].startswith("worm") else "--"
        axes[0].plot(levels, 100 * np.array(r["acc_lvl"]), style, ms=3, label=r["label"])
        if r["label"].startswith("worm"):
            axes[1].plot(levels, r["it_lvl"], "-o", ms=3, label=r["label"])
    for r in rows:
        if r["label"].startswith("tied"):
            axes[1].axhline(int(r["label"].split("=")[1]), color="grey", lw=0.6, ls=":")
    axes[0].set(xlabel="level: longest run of propagating positions", ylabel="test accuracy % (strat)",
                title="accuracy per difficulty")
    axes[1].set(xlabel="level: longest run of propagating positions", ylabel="body evaluations per sample",
                title="iterations per difficulty (dotted: tied K)")
    for r in rows:
        fixed = not r["label"].startswith("worm")
        x = 1 if r["label"] == "plain" else (int(r["label"].split("=")[1]) if fixed else r["nat_it"])
        axes[2].scatter(x, 100 * r["nat_acc"], marker="s" if fixed else "o", s=30)
        axes[2].annotate(r["label"], (x, 100 * r["nat_acc"]), fontsize=7, xytext=(3, -8), textcoords="offset points")
    axes[2].set(xlabel="mean body evaluations per sample (nat)", ylabel="test accuracy % (nat)",
                title="compute vs accuracy on random additions")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="adaptive_out")
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timing-rounds", type=int, default=5)
    a = ap.parse_args(argv)
    seeds = a.seeds or ([0] if a.quick else [0, 1, 2])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    runs = [replace(r, seed=s, save=str(out / "models" / f"{slug(r)}.pt") if s == seeds[0] else "")
            for r in variants(a.quick) for s in seeds]
    with ProcessPoolExecutor(max_workers=a.workers) as pool:
        results = list(pool.map(_train, runs))
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    rows = summarise(results)
    times = time_variants(variants(a.quick), out / "models", 2 if a.quick else a.timing_rounds)
    text = table(rows, times)
    text += "\n\nmatched accuracy (within 1 point): smallest fixed K and wormhole mean iterations / K\n"
    for key in ("acc", "nat_acc"):
        for label, (K, ratio) in matched(rows, key).items():
            text += f"  {key:<8} {label:<24} K={K}  ratio {ratio:.2f}\n"
    print(text)
    (out / "table.md").write_text(text + "\n")
    plot(rows, out / "adaptive_depth.png")


if __name__ == "__main__":
    sys.exit(main())
