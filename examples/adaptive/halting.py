"""Learned per-sample halting for a wormhole fixed point: stop when the answer is final.

The library stops a sample when the fixed-point residual is below ``tol``, which also spends the
evaluations of the convergence tail, after the prediction has stopped changing. Here a small
*halting head* reads the body output ``y_k`` at every evaluation and predicts whether the
network's prediction is already the one it will give at the fixed point; the sample stops at the
first evaluation whose halting probability exceeds ``threshold`` (or when the residual test
passes, or at ``max_iter``). This links halting to benefit directly: the label is "iterating
further would not change this sample's answer".

Training: on the trained wormhole model (its weights frozen), run the Picard iteration from
``z = 0`` for ``max_iter`` evaluations with no gradient, record ``y_k`` and the per-position
prediction ``p_k = head(y_k) > 0``; a position is final at ``k`` when ``p_j`` equals the
fixed-point prediction for every ``j >= k``. The halting head (two 1x1 convolutions on the source
map, one logit per position) is fitted to those labels with binary cross-entropy; the sample's
halting logit is the least sure position's (min over positions).

Inference (:func:`solve_with_halting`) mirrors the library's eager loop: per-sample halting with
the active set shrunk as samples stop, so the saved evaluations are saved time. It is what the
design note proposes as ``FixedPoint(halt=...)``.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from probe import Call, CycleProbe


class HaltingHead(nn.Module):
    """Per-position "final" logits from the source map ``h [B, C, L]``; ``forward`` returns the
    sample's logit (min over positions) and the per-position logits."""

    def __init__(self, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, 1, 1))

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        per_position = self.net(h).squeeze(1)
        return per_position.min(-1).values, per_position


def trajectory(probe: CycleProbe, call: Call, steps: int) -> list:
    """Body outputs ``y_1 .. y_steps`` of the Picard iteration from ``z = 0`` (no grad)."""
    ys = []
    with torch.no_grad():
        z = torch.zeros_like(probe.z_star(call))
        for _ in range(steps):
            y = call.node.body(z, *call.inputs)
            ys.append(y)
            z = probe.feedback(call, y)[0]
    return ys


def final_labels(preds: Tensor) -> Tensor:
    """``preds [K, B, L]`` (predicted bits per evaluation) -> ``[K, B, L]`` float: the prediction at
    evaluation k equals the last one and never changes after k."""
    same = preds == preds[-1:]
    # suffix-all over k: final at k iff same at every j >= k
    return same.flip(0).cumprod(0).flip(0).float()


def fit_halting(net: nn.Module, probe: CycleProbe, readout: Callable[[Tensor], Tensor], sample: Callable[[int], Tensor],
                channels: int, steps: int = 300, batch: int = 64, max_iter: int = 12, lr: float = 3e-3,
                seed: int = 0) -> HaltingHead:
    """Fit a :class:`HaltingHead` on trajectories of the trained ``net`` (``readout(h) -> logits``;
    ``sample(n) -> x``). The wormhole model is not changed."""
    torch.manual_seed(seed)
    head = HaltingHead(channels)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    net.eval()
    for _ in range(steps):
        with torch.no_grad():
            net(sample(batch))
        call = probe.calls[0]
        hs = [y[0] for y in trajectory(probe, call, max_iter)]
        with torch.no_grad():
            labels = final_labels(torch.stack([readout(h) > 0 for h in hs]))
        logits = torch.stack([head(h)[1] for h in hs])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.train()
    return head


def solve_with_halting(probe: CycleProbe, call: Call, head: HaltingHead, threshold: float, tol: float,
                       max_iter: int) -> Tuple[Tensor, Tensor]:
    """Picard iteration from ``z = 0`` with per-sample halting (learned or residual, whichever
    comes first), shrinking the active set. Returns ``(y*[0] per sample, evaluations per sample)``."""
    with torch.no_grad():
        inputs = call.inputs
        B = inputs[0].shape[0]
        z = torch.zeros_like(probe.z_star(call))
        rows = torch.arange(B)
        iters = torch.zeros(B, dtype=torch.long)
        out = None
        for k in range(1, max_iter + 1):
            ins = tuple(t[rows] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B else t for t in inputs)
            y = call.node.body(z, *ins)
            fb = call.node.feedback(y, *ins)
            z_next, scale = fb if isinstance(fb, (tuple, list)) and len(fb) == 2 else (fb, None)
            h = y[0]
            if out is None:
                out = h.new_zeros((B,) + h.shape[1:])
            dz = (z_next - z).flatten(1).norm(dim=1)
            ref = z_next.flatten(1).norm(dim=1) + (scale if scale is not None else 0.0)
            stop = (torch.sigmoid(head(h)[0]) > threshold) | (dz <= tol * ref) | (k == max_iter)
            out[rows[stop]] = h[stop]
            iters[rows[stop]] = k
            keep = ~stop
            if not bool(keep.any()):
                break
            rows, z = rows[keep], z_next[keep]
        return out, iters


def main(argv=None) -> None:
    """Fit a halting head on a model saved by ``experiment.py`` and compare it with the residual test."""
    import argparse
    import sys
    from dataclasses import replace

    import numpy as np
    from scipy.stats import spearmanr

    from experiment import WORM, slug
    from tasks import Addition
    from train import build

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="adaptive_out", help="experiment.py's output folder")
    ap.add_argument("--lam-first", type=float, default=1.0, help="which wormhole model (its compute-cost weight)")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = replace(WORM, lam_first=a.lam_first)
    task = Addition(run.bits)
    sets = {"strat": task.sample(1200, np.random.default_rng(10_000), per_level=True),
            "nat": task.natural(2000, np.random.default_rng(20_000))}
    net = build(run, task, sets["strat"][0][:4])
    net.load_state_dict(torch.load(f"{a.out}/models/{slug(run)}.pt"))
    probe = CycleProbe(net)
    readout = lambda h: net.head(h).squeeze(1)
    rng = np.random.default_rng(5)
    head = fit_halting(net, probe, readout, lambda n: task.sample(n, rng)[0], run.channels, steps=a.steps)
    net.eval()
    for name, (x, y, d) in sets.items():
        with torch.no_grad():
            acc = float(task.correct(net(x), y).float().mean())
        it = probe.iterations
        print(f"{name:<5} residual test (library): acc {100 * acc:.1f} %  mean it {float(it.mean()):.2f}  rho {spearmanr(d, it).correlation:.2f}")
        for th in (0.5, 0.9, 0.99):
            h, it = solve_with_halting(probe, probe.calls[0], head, th, run.tol, run.max_iter)
            acc = float(task.correct(readout(h), y).float().mean())
            rho = spearmanr(d, it).correlation if it.float().std() > 0 else float("nan")
            print(f"      learned halting p > {th}: acc {100 * acc:.1f} %  mean it {float(it.float().mean()):.2f}  rho {rho:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
