"""Does the convergence test measure the cycle or the input's norm? (issue 17, item 1)

The library stops a sample when ``||z_{k+1} - z_k|| / (||z_{k+1}|| + ||x|| + eps) <= tol``, where
``x`` is the destination layer's input for *that sample*. Additive noise inflates ``||x||``, so
noisy (hard) inputs pass the test sooner: the prototype measured rho(difficulty, iterations) =
-0.18 on raw noisy digits, and only per-sample input normalisation made it positive.

This script trains the prototype's wormhole MLP (fc3 -> fc1, input gate, spectral norm, gate cap
0.5, contraction regulariser) on noisy digits with *raw* inputs, then re-runs the same Picard
iteration by hand (through :class:`probe.CycleProbe`) and counts, per test sample, the evaluations
each candidate test needs:

* ``input``  (today): ``||dz|| / (||z'|| + ||x_b||)``;
* ``fixed``: ``||dz|| / (||z'|| + s)`` with ``s`` one number per node, the mean ``||x||`` over the
  training data (a running mean in the library): every sample is measured with the same yardstick;
* ``state``: ``||dz|| / max(||z'||, s * tol_floor)``: the change relative to the state itself, with a
  floor so that a closed wormhole still stops at once.

    python examples/adaptive/residual_scale.py [--epochs 40] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

import fxwormhole
from fxwormhole import WormholeConfig

from probe import CycleProbe, penalty
from tasks import NoisyDigits


class MLP(nn.Module):
    """The prototype's MLP: 64 -> 64 -> 64 -> 64 -> 10 with tanh."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))))


CONFIG = WormholeConfig(wormholes=[("fc3", "fc1")], gate="input", gate_init=-2.0, proj_init="normal", proj_std=0.1,
                        solver="picard", tol=1e-3, max_iter=30, on_fail="ignore", spectral_norm=True, gate_cap=0.5)
CRITERIA = ("input", "fixed", "state")


def iterations_by_criterion(probe: CycleProbe, s_fixed: float, tol: float, max_iter: int, floor: float = 1e-2) -> dict:
    """Evaluations of ``T`` each stopping test needs, per sample, on the last forward's call."""
    call = probe.calls[0]
    x_norm = probe.input_scale(call)
    with torch.no_grad():
        z = torch.zeros_like(probe.z_star(call))
        done = {c: torch.zeros(len(x_norm), dtype=torch.long) for c in CRITERIA}
        for k in range(1, max_iter + 1):
            z_next = probe.cycle_map(call, z)
            dz = (z_next - z).flatten(1).norm(dim=1)
            zn = z_next.flatten(1).norm(dim=1)
            r = {"input": dz / (zn + x_norm + 1e-12), "fixed": dz / (zn + s_fixed),
                 "state": dz / torch.maximum(zn, torch.full_like(zn, floor * s_fixed))}
            for c in CRITERIA:
                newly = (done[c] == 0) & ((r[c] <= tol) | (k == max_iter))
                done[c][newly] = k
            z = z_next
    return done


def run(seed: int, epochs: int, lam_jac: float = 1.0) -> dict:
    torch.manual_seed(seed)
    data = NoisyDigits(normalise=False)
    rng = np.random.default_rng(100 + seed)
    net = fxwormhole.transform(MLP(), (data.x_test[:8],), CONFIG)
    probe = CycleProbe(net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        x, y, _ = data.train_epoch(rng)
        for i in range(0, len(y), 64):
            loss = F.cross_entropy(net(x[i:i + 64]), y[i:i + 64]) + penalty(probe, {"jac": lam_jac})
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        # the fixed yardstick: mean ||x_dst|| (fc1's input = the image) over clean-and-noisy training data
        xs = data.train_epoch(np.random.default_rng(7))[0]
        s_fixed = float(xs.norm(dim=1).mean())
        logits = net(data.x_test)
        lib_it = probe.iterations.clone()
        counts = iterations_by_criterion(probe, s_fixed, CONFIG.tol, CONFIG.max_iter)
    d = data.d_test
    acc = float((logits.argmax(-1) == data.y_test).float().mean())
    out = {"seed": seed, "acc": acc, "xnorm_lvl": [float(data.x_test[d == l].norm(dim=1).mean()) for l in data.levels],
           "lib_matches_input": float((lib_it == counts["input"]).float().mean())}
    for c in CRITERIA:
        it = counts[c].float()
        out[c] = {"rho": float(spearmanr(d.numpy(), it.numpy()).correlation), "mean": float(it.mean()),
                  "lvl": [float(it[d == l].mean()) for l in data.levels]}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for s in a.seeds:
        r = run(s, a.epochs)
        print(f"seed {s}: acc {r['acc']:.3f}; library count == 'input' count on {100 * r['lib_matches_input']:.0f}% of samples; "
              f"||x|| by level " + " ".join(f"{v:.1f}" for v in r["xnorm_lvl"]))
        for c in CRITERIA:
            print(f"  {c:<6} rho {r[c]['rho']:+.2f}  mean it {r[c]['mean']:.2f}  by level " + " ".join(f"{v:.2f}" for v in r[c]["lvl"]))


if __name__ == "__main__":
    sys.exit(main())
