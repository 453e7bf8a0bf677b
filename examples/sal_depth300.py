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
"""
from __future__ import annotations

import argparse
import copy
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
    ap.add_argument("--load", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.load:
        with open(args.load) as f:
            result = json.load(f)
    else:
        log = lambda s: print(s, flush=True)  # noqa: E731
        run = Run(args.depth)
        log(f"warm-up to step {args.branch}")
        warm = run.train(0, args.branch, LR, 0.0, args.every, log)
        result = {"depth": args.depth, "branch": args.branch, "warmup": warm[:-1], "variants": {}}
        for name in args.variants.split(","):
            lr, changes, clip = VARIANTS[name]
            log(name)
            result["variants"][name] = run.branch(changes, lr).train(args.branch, args.iters, lr, clip, args.every, log)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f)
    print(f"{'variant':<20} " + " ".join(f"seed {s}" for s in SEEDS) + "   (share of evaluations after the branch with acc >= 0.95)")
    for name, rows in result["variants"].items():
        share = [sum(r["acc"][s] >= 0.95 for r in rows) / len(rows) for s in range(len(SEEDS))]
        print(f"{name:<20} " + " ".join(f"{v:6.2f}" for v in share))
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
