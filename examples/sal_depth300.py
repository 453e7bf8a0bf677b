"""Why BP + SAL on a 300-layer tanh MLP reaches 0.95 and then collapses, and what holds it.

Five seeds (packed as one block-diagonal network, see ``sal_compare.py``) train with BP + SAL
(SGD lr 0.003, SAL step 1e-3, one-sided) from the small start until step ``--branch`` (SAL has
then brought every neuron's sensitivity near 1). From that common state, each variant trains on:

* ``as before``     -- nothing changed: accuracy flips between ~0.95 and chance;
* ``lr 0.001``      -- a third of the step size;
* ``two-sided``     -- SAL also lowers sensitivity above the target;
* ``clip 1``        -- the usual fix for exploding gradients, clip_grad_norm_(1): it clips SAL too;
* ``separate + clip 1`` -- ``SALConfig(separate_step=True)``: the task gradient is clipped, SAL not;
* ``SAL off``       -- SAL switched off at the branch point.

Every ``--every`` steps it records each seed's test accuracy, the largest Lyapunov exponent of the
layer chain (per layer) and the spread of the last hidden layer over the test inputs.

    python examples/sal_depth300.py --out depth300.json --plot docs/img/sal_depth300.png
    python examples/sal_depth300.py --load depth300.json --plot fig.png     # plot only

``--warmup-checkpoint PATH`` saves the state at the branch point (weights, probe statistics, data
streams) or, when PATH exists, starts the variants from it without training the warm-up again;
``--load a.json,b.json`` merges the variants of several runs from the same warm-up.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

from fxwormhole.config import SALConfig
from fxwormhole.instrument import instrument
from fxwormhole.runtime.sensitivity import sal_step

_spec = importlib.util.spec_from_file_location("sal_compare", pathlib.Path(__file__).with_name("sal_compare.py"))
cmp = importlib.util.module_from_spec(_spec)
sys.modules["sal_compare"] = cmp
_spec.loader.exec_module(cmp)

SEEDS = (0, 1, 2, 3, 4)
DEPTH, LR, ETA_ABS = 300, 0.003, 1e-3
VARIANTS = {  # name -> (lr, SALConfig changes, clip)
    "as before": (LR, {}, 0.0),
    "lr 0.001": (0.001, {}, 0.0),
    "two-sided": (LR, {"two_sided": True}, 0.0),
    "clip 1": (LR, {}, 1.0),
    "separate + clip 1": (LR, {"separate_step": True}, 1.0),
    "SAL off": (LR, {"enabled": False}, 0.0),
}


def sal_for(lr: float, changes: dict) -> SALConfig:
    """SAL's absolute step stays ETA_ABS: through .grad it is lr * eta, with separate_step eta itself."""
    separate = changes.get("separate_step", False)
    return SALConfig(eta=ETA_ABS if separate else ETA_ABS / lr, **changes)


class Run:
    """The packed five-seed network, its data streams and its recorder."""

    def __init__(self, depth: int = DEPTH):
        self.packed = cmp.Packed([cmp.small_mlp(depth, s) for s in SEEDS])
        self.model = instrument(self.packed.net, (torch.zeros(2, 2 * len(SEEDS)),), sal_for(LR, {})).train()
        self.gens = [torch.Generator().manual_seed(40_000 + s) for s in SEEDS]
        self.xte, self.yte = cmp.mlp_data(2000, torch.Generator().manual_seed(123))
        self.diag = torch.Generator().manual_seed(7)

    def record(self, it: int, rows: list) -> None:
        model, n = self.model, len(SEEDS)
        xte = self.xte.repeat(1, n)
        model.eval()
        with torch.no_grad():
            acc = ((model(xte) > 0).float() == self.yte[:, None]).float().mean(0).tolist()
            lam = cmp.forward_growth(model, self.packed, xte[:128], self.diag).tolist()
            h = xte
            for lin in self.packed._linears(model)[:-1]:
                h = torch.tanh(F.linear(h, lin.weight, lin.bias))
            spread = h.view(len(xte), n, -1).std(0).mean(1).tolist()
        model.train()
        rows.append({"it": it, "acc": acc, "lyapunov": lam, "spread": spread})

    def train(self, start: int, stop: int, lr: float, clip: float, every: int, log) -> list:
        opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        rows: list = []
        t0 = time.time()
        for it in range(start, stop + 1):
            if it % every == 0 or it == stop:
                self.record(it, rows)
                log(f"  it {it:5d} acc {' '.join(f'{a:.2f}' for a in rows[-1]['acc'])} "
                    f"lambda {' '.join(f'{v:+.3f}' for v in rows[-1]['lyapunov'])} ({time.time() - t0:.0f}s)")
            if it == stop:
                break
            batch = [cmp.mlp_data(128, g) for g in self.gens]
            x, y = torch.cat([b[0] for b in batch], 1), torch.stack([b[1] for b in batch], 1)
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(self.model(x), y, reduction="sum").div(128).backward()
            self.packed.mask_grads(self.model)
            if clip:
                self.packed.clip_per_seed(self.model, clip)
            opt.step()
            sal_step(self.model)
        return rows

    def save(self, path: str) -> None:
        torch.save({"model": self.model.state_dict(), "gens": [g.get_state() for g in self.gens],
                    "diag": self.diag.get_state()}, path)

    def load(self, path: str) -> None:
        state = torch.load(path, weights_only=True)
        self.model.load_state_dict(state["model"])
        for g, st in zip(self.gens, state["gens"]):
            g.set_state(st)
        if "diag" in state:  # the diagnostics' random tangents (older checkpoints lack them)
            self.diag.set_state(state["diag"])

    def branch(self, changes: dict, lr: float) -> "Run":
        """A copy of this run (weights, probe statistics, data streams) under a changed SAL rule."""
        new = copy.copy(self)
        new.model = instrument(self.packed.net, (torch.zeros(2, 2 * len(SEEDS)),), sal_for(lr, changes)).train()
        new.model.load_state_dict(self.model.state_dict())
        new.gens = [torch.Generator() for _ in self.gens]
        for g, old in zip(new.gens, self.gens):
            g.set_state(old.get_state())
        new.diag = torch.Generator()
        new.diag.set_state(self.diag.get_state())
        return new


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 4.6), sharex=True, sharey="row")
    warm = result["warmup"]
    for col, name in enumerate(names):
        rows = warm + result["variants"][name]
        steps = [r["it"] for r in rows]
        for s in range(len(SEEDS)):
            axes[0, col].plot(steps, [r["acc"][s] for r in rows], lw=0.9)
            axes[1, col].plot(steps, [r["lyapunov"][s] for r in rows], lw=0.9)
        for ax in axes[:, col]:
            ax.axvline(result["branch"], color="k", ls=":", lw=0.8)
        axes[0, col].axhline(0.95, color="gray", ls="--", lw=0.6)
        axes[1, col].axhline(0.0, color="gray", ls="--", lw=0.6)
        axes[0, col].set_title(name, fontsize=9)
        axes[1, col].set_xlabel("training step")
    axes[0, 0].set_ylabel("test accuracy (5 seeds)")
    axes[1, 0].set_ylabel("Lyapunov exponent / layer")
    axes[1, 0].set_ylim(-0.08, 0.03)
    fig.suptitle(f"depth {result.get('depth', DEPTH)}, width 16, BP + SAL; variants branch at step {result['branch']} (dotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=DEPTH)
    ap.add_argument("--branch", type=int, default=500)
    ap.add_argument("--iters", type=int, default=1200)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--load", default=None, help="plot/print saved --out file(s) (comma-separated: merged)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--warmup-checkpoint", default=None, help="save the branch-point state here, or start from it")
    ap.add_argument("--compare-row", default=None, help="write warm-up + --compare-variant as sal_compare's "
                                                        "depth-300 SAL row (JSON for its --load)")
    ap.add_argument("--compare-variant", default="separate + clip 1")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.load:
        result = None
        for path in args.load.split(","):
            with open(path) as f:
                part = json.load(f)
            if result is None or (not result["warmup"] and part["warmup"]):
                result, variants = part, {**(result or {}).get("variants", {}), **part["variants"]}
                result["variants"] = variants
            else:
                result["variants"].update(part["variants"])
    else:
        log = lambda s: print(s, flush=True)  # noqa: E731
        run = Run(args.depth)
        if args.warmup_checkpoint and pathlib.Path(args.warmup_checkpoint).exists():
            log(f"warm-up state from {args.warmup_checkpoint} (step {args.branch})")
            run.load(args.warmup_checkpoint)
            warm = [None]
        else:
            log(f"warm-up to step {args.branch}")
            warm = run.train(0, args.branch, LR, 0.0, args.every, log)
            if args.warmup_checkpoint:
                run.save(args.warmup_checkpoint)
        result = {"depth": args.depth, "branch": args.branch, "warmup": warm[:-1], "variants": {}}
        for name in args.variants.split(","):
            lr, changes, clip = VARIANTS[name]
            log(name)
            result["variants"][name] = run.branch(changes, lr).train(args.branch, args.iters, lr, clip, args.every, log)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f)
    print(summary(result))
    if args.plot:
        plot(result, args.plot)
    if args.compare_row:
        write_compare_row(result, args.compare_row, args.compare_variant)
    return result


def summary(result: dict) -> str:
    """Per variant: seeds at >= 0.95 at every evaluation of the last quarter of its steps, each
    seed's lowest accuracy there, and each seed's share of evaluations >= 0.95 after the branch."""
    lines = ["| variant | steps | held >= 0.95 (last quarter) | lowest acc in the last quarter, per seed "
             "| share of evaluations >= 0.95 after the branch, per seed |", "|---|---|---|---|---|"]
    for name, rows in result["variants"].items():
        tail = rows[len(rows) - max(1, len(rows) // 4):]
        low = [min(r["acc"][s] for r in tail) for s in range(len(SEEDS))]
        share = [sum(r["acc"][s] >= 0.95 for r in rows) / len(rows) for s in range(len(SEEDS))]
        lines.append(f"| {name} | {rows[0]['it']}-{rows[-1]['it']} | {sum(v >= 0.95 for v in low)}/{len(SEEDS)} | "
                     + " ".join(f"{v:.3f}" for v in low) + " | " + " ".join(f"{v:.2f}" for v in share) + " |")
    return "\n".join(lines)


def write_compare_row(result: dict, path: str, variant: str) -> None:
    """The warm-up plus ``variant`` as the depth-300 SAL row of ``sal_compare.py`` (its --load format):
    the same seeds, data streams, test set and step budget as the comparison's other methods."""
    rows = result["warmup"] + result["variants"][variant]
    curves = [cmp.Curve(s, [r["it"] for r in rows], [r["acc"][i] for r in rows], {"lyapunov": [r["lyapunov"][i] for r in rows]})
              for i, s in enumerate(SEEDS)]
    base = next(t for t in cmp.default_tasks(False) if t.name == f"depth {DEPTH}")
    task = dataclasses.replace(base, name=f"depth {result['depth']}", size=result["depth"], iters=rows[-1]["it"])
    row = cmp.Row(task.name, f"sal ({variant}, warm-up checkpoint)", None, curves, cmp.time_per_step(task, "sal", 1.0),
                  cmp.setup_seconds(task, "sal", 1.0))
    with open(path, "w") as f:
        json.dump({"rows": [row.summary()], "curves": {task.name: {row.summary()["method"]: {
            "curves": [copy.deepcopy(vars(c)) for c in curves]}}}}, f)


if __name__ == "__main__":
    main()
