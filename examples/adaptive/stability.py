"""Stable-by-default training of active feedback: the user's 3-conv CNN and the zoo models on digits.

Every model is trained on scikit-learn's 8x8 digits (fixed split, no download) three ways from the
same initial weights and batches:

* ``original``: the model as written;
* ``user``: :func:`fxwormhole.transform` with feedback active from the start, as the issue's user
  configured it (input gates at -1, normal projections of std 0.1, Anderson to 1e-5, SAL at 1e-3) and
  no stabiliser;
* recipes: ``user`` plus stabilisers (spectral norm, gate cap, the per-sample contraction
  regulariser ``lam * ||J_T(z*) v||^2`` read through :class:`probe.CycleProbe`, automatic damping).

Per run: test accuracy, the steps at which any sample of any node did not converge ("the map
stopped contracting"), mean forward iterations, and the largest local contraction rate seen
(power iteration at ``z*`` every ``rate_every`` steps).

    python examples/adaptive/stability.py --models UserCNN --variants original user recipe --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fxwormhole
from fxwormhole import SALConfig, WormholeConfig, zoo
from fxwormhole.cli.demo import digits_sequences

from probe import CycleProbe, penalty


class UserCNN(nn.Module):
    """The kind of 3-conv CNN a user writes for 8x8 digits (the issue's report)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


# name -> (constructor, input layout, wormholes): layouts "flat" [B, 64], "image" [B, 1, 8, 8], "rows" [B, 8, 8]
MODELS: Dict[str, tuple] = {
    "UserCNN": (lambda: UserCNN(), "image", [("conv3", "conv1")]),
    "MLP": (lambda: zoo.MLP(in_features=64, hidden=64, out_features=10, depth=3), "flat", "auto"),
    "CNN": (lambda: zoo.CNN(in_channels=1, channels=16, size=8, hidden=32, classes=10), "image", "auto"),
    "ResidualMLP": (lambda: zoo.ResidualMLP(in_features=64, dim=32, hidden=64, blocks=2, out_features=10), "flat", "auto"),
    "TransformerStack": (lambda: zoo.TransformerStack(d_model=8, nhead=2, dim_feedforward=32, layers=2, seq=8, classes=10), "rows", "auto"),
    "LSTMClassifier": (lambda: zoo.LSTMClassifier(in_features=8, hidden=32, num_layers=2, seq=8, classes=10), "rows", "auto"),
    "GRUClassifier": (lambda: zoo.GRUClassifier(in_features=8, hidden=32, num_layers=2, seq=8, classes=10), "rows", "auto"),
    "RNNClassifier": (lambda: zoo.RNNClassifier(in_features=8, hidden=32, num_layers=2, seq=8, classes=10), "rows", "auto"),
    "GRUCellLoop": (lambda: zoo.GRUCellLoop(in_features=8, hidden=32, steps=8, classes=10), "rows", "auto"),
}

#: The issue's user configuration: feedback active from the start, no stabiliser.
USER = WormholeConfig(gate="input", gate_init=-1.0, proj_init="normal", proj_std=0.1)


@dataclass
class Variant:
    """How a run is configured: the wormhole config changes and the regulariser weights."""

    name: str
    transform: bool = True
    changes: dict = field(default_factory=dict)      # replace() on USER
    weights: dict = field(default_factory=dict)      # penalty() weights, e.g. {"jac": 1.0}
    auto_damp: bool = False
    sal: bool = True
    recommended: bool = False                        # start from WormholeConfig.active() instead of USER


VARIANTS = {
    "original": Variant("original", transform=False, sal=False),
    "user": Variant("user"),
    "sn_cap": Variant("sn_cap", changes=dict(spectral_norm=True, gate_cap=0.5)),
    "damp": Variant("damp", auto_damp=True),
    "jac": Variant("jac", weights={"jac": 1.0}),
    "recipe": Variant("recipe", changes=dict(spectral_norm=True, gate_cap=0.5), weights={"jac": 1.0}),
    # the library's recommended configuration: its regulariser is added by the nodes themselves
    "active": Variant("active", recommended=True, sal=False),
    "active_sal": Variant("active_sal", recommended=True),
}


class AutoDamp:
    """Automatic damping: when a node's solve fails (max_iter / diverged), switch that node to the
    damped iteration ``z <- (1 - d) z + d T(z)`` with ``d`` halved (down to ``floor``), and raise one
    warning per node instead of one per step. Works on the node's public ``solver_config``."""

    def __init__(self, probe: CycleProbe, floor: float = 0.125) -> None:
        self.probe, self.floor, self.events = probe, floor, []

    def after_forward(self, step: int) -> None:
        for call in self.probe.calls:
            st = call.node.stats
            if st is None or bool((st.status == 0).all()):
                continue
            cfg = call.node.solver_config
            damping = cfg.damping if cfg.name == "damped" else 1.0
            if damping <= self.floor:
                continue
            new = max(self.floor, damping / 2)
            call.node.solver_config = replace(cfg, name="damped", damping=new)
            self.events.append((step, call.node.name, new))


def node_health(net: nn.Module) -> tuple:
    """``(every forward solve converged, every adjoint converged, mean iterations per sample)`` of the
    last call, from the public ``net.fixed_point_stats()`` (graph nodes and temporal steps alike)."""
    fwd_ok, bwd_ok = True, True
    for st in net.fixed_point_stats().values():
        if st is None:
            continue
        fwd_ok &= bool((st.status == 0).all())
        if st.backward_status is not None:
            bwd_ok &= bool((st.backward_status == 0).all())
    fwd = fxwormhole.transformed.per_sample_iterations(net)[0]
    return fwd_ok, bwd_ok, float(fwd.mean()) if fwd is not None else 1.0


def digits(layout: str):
    xtr, ytr, xte, yte = digits_sequences("rows", seed=0)  # [N, 8, 8] in [0, 1]
    shape = {"flat": (-1, 64), "image": (-1, 1, 8, 8), "rows": (-1, 8, 8)}[layout]
    return xtr.reshape(shape), ytr, xte.reshape(shape), yte


def run(model_name: str, variant: Variant, seed: int, steps: int = 300, batch: int = 32, lr: float = 1e-2,
        rate_every: int = 10) -> dict:
    make, layout, wormholes = MODELS[model_name]
    xtr, ytr, xte, yte = digits(layout)
    torch.manual_seed(seed)
    model = make()
    if variant.transform:
        base = WormholeConfig.active() if variant.recommended else USER
        cfg = replace(base, wormholes=wormholes, **variant.changes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = fxwormhole.transform(model, (xtr[:4],), cfg, sal=SALConfig(eta=1e-3) if variant.sal else None)
        probe = CycleProbe(net)
    else:
        net, probe = model, None
    damp = AutoDamp(probe) if (variant.auto_damp and probe) else None
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1000 + seed)  # same batches for every variant
    bad_steps, bad_backward, its, max_rate, times, warned = [], [], [], 0.0, [], 0
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(ytr), (batch,), generator=gen)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            if probe is not None:
                if damp is not None:
                    damp.after_forward(step)
                loss = loss + penalty(probe, variant.weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        fwd_ok, bwd_ok, it = node_health(net) if probe is not None else (True, True, 1.0)
        if not bwd_ok:
            bad_backward.append(step)
        times.append(time.perf_counter() - t0)
        warned += sum(1 for w in caught if issubclass(w.category, RuntimeWarning))
        if probe is not None:
            if not fwd_ok:
                bad_steps.append(step)
            its.append(it)
            if step % rate_every == 0 and probe.calls:  # graph nodes (the probe cannot see temporal steps)
                max_rate = max(max_rate, float(probe.contraction_rate().max()))
    net.eval()
    with torch.no_grad():
        acc = float((net(xte).argmax(-1) == yte).float().mean())
        test_bad = float(not node_health(net)[0]) if probe else 0.0
        test_it = node_health(net)[2] if probe else 1.0
    return {"model": model_name, "variant": variant.name, "seed": seed, "steps": steps, "acc": acc,
            "bad_steps": len(bad_steps), "first_bad": bad_steps[0] if bad_steps else None,
            "bad_backward_steps": len(bad_backward), "first_bad_backward": bad_backward[0] if bad_backward else None,
            "train_it_first50": sum(its[:50]) / max(1, len(its[:50])), "train_it_last50": sum(its[-50:]) / max(1, len(its[-50:])),
            "max_train_it": max(its) if its else 1.0, "max_rate": max_rate, "test_it": test_it,
            "test_not_converged": test_bad, "warnings": warned, "ms_per_step": 1000 * sorted(times)[len(times) // 2],
            "damp_events": damp.events if damp else []}


def table(paths: list) -> str:
    """A markdown table of the JSON lines in ``paths``: per model and variant, accuracy per seed and
    mean, steps with a forward / adjoint failure, largest contraction rate, iterations, ms per step."""
    rows: Dict[tuple, list] = {}
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            rows.setdefault((r["model"], r["variant"]), []).append(r)
    out = ["| model | variant | test acc % per seed | mean | steps with a forward failure | adjoint failures | "
           "largest rate | iterations (first 50 -> last 50 steps) | ms/step |", "|---|---|---|---|---|---|---|---|---|"]
    for (m, v), rs in rows.items():
        rs.sort(key=lambda r: r["seed"])
        acc = "/".join(f"{100 * r['acc']:.1f}" for r in rs)
        mean = 100 * sum(r["acc"] for r in rs) / len(rs)
        ms = sorted(r["ms_per_step"] for r in rs)[len(rs) // 2]
        if v == "original":
            out.append(f"| {m} | {v} | {acc} | {mean:.1f} | - | - | - | 1 | {ms:.0f} |")
            continue
        join = lambda key, fmt="{}": "/".join(fmt.format(r[key]) for r in rs)  # noqa: E731
        its = "/".join(f"{r['train_it_first50']:.1f}->{r['train_it_last50']:.1f}" for r in rs)
        rate = join("max_rate", "{:.2f}") if any(r["max_rate"] for r in rs) else "-"
        out.append(f"| {m} | {v} | {acc} | {mean:.1f} | {join('bad_steps')} | {join('bad_backward_steps')} | {rate} | {its} | {ms:.0f} |")
    return "\n".join(out)


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["UserCNN"])
    ap.add_argument("--variants", nargs="+", default=["original", "user", "recipe"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--table", nargs="+", metavar="JSONL", help="print the markdown table of these results and exit")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.table))
        return
    torch.set_num_threads(1)
    for m in a.models:
        for s in a.seeds:
            for v in a.variants:
                r = run(m, VARIANTS[v], s, a.steps)
                print(f"{m:<16} {v:<9} seed {s}  acc {r['acc']:.3f}  bad steps fwd {r['bad_steps']:3d} (first {r['first_bad']}) bwd {r['bad_backward_steps']:3d}  "
                      f"it {r['train_it_first50']:.1f}->{r['train_it_last50']:.1f} (max {r['max_train_it']:.1f})  "
                      f"max rate {r['max_rate']:.2f}  warnings {r['warnings']}  {r['ms_per_step']:.0f} ms/step", flush=True)
                if a.out:
                    with open(a.out, "a") as fh:
                        fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
