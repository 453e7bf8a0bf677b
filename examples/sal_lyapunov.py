"""Log RMS sensitivity vs the maximum Lyapunov exponent of a random tanh RNN, and SAL to the edge of chaos.

1. For gains g in 0.5..3, W ~ N(0, g^2/N): lambda_max by Jacobian-vector renormalisation and the
   time-averaged log RMS sensitivity log sqrt(mean_j s_j^2), s_j = f'(U_j) ||w_j||.
2. From small random weights (g0 = 0.2), one-sided SAL (fxwormhole.instrument on an RNNCell, no task)
   drives lambda_max from negative to about 0.

    python examples/sal_lyapunov.py            # short run (seconds)
    python examples/sal_lyapunov.py --full     # longer trajectories and SAL run, optional plot
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn

import fxwormhole
from fxwormhole.config import SALConfig
from fxwormhole.instrument import instrument


class Autonomous(nn.Module):
    """h_{t+1} = tanh(W h_t + b) for ``steps`` steps (the cell's input weights are zero)."""

    def __init__(self, n: int, steps: int):
        super().__init__()
        self.cell, self.steps = nn.RNNCell(1, n), steps

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        for t in range(self.steps):
            h = self.cell(x[t], h)
        return h


@torch.no_grad()
def lyapunov_and_log_sensitivity(W: torch.Tensor, b: torch.Tensor, steps: int, burn: int, seed: int = 1):
    """(lambda_max, time-averaged log RMS sensitivity) of h <- tanh(W h + b)."""
    gen = torch.Generator().manual_seed(seed)
    n = W.shape[0]
    h = torch.rand(n, generator=gen, dtype=W.dtype) - 0.5
    v = torch.randn(n, generator=gen, dtype=W.dtype)
    v /= v.norm()
    norm = W.norm(dim=1)
    lam = logs = 0.0
    for t in range(steps):
        h = torch.tanh(W @ h + b)
        d = 1 - h ** 2
        if t >= burn:
            jv = d * (W @ v)
            g = jv.norm()
            lam += math.log(float(g))
            v = jv / g
            logs += 0.5 * math.log(float(((d * norm) ** 2).mean()))
    k = steps - burn
    return lam / k, logs / k


def gain_table(n: int, gains, steps: int, burn: int):
    rows = []
    for g in gains:
        gen = torch.Generator().manual_seed(2)
        W = torch.randn(n, n, generator=gen, dtype=torch.float64) * g / math.sqrt(n)
        lam, ls = lyapunov_and_log_sensitivity(W, torch.zeros(n, dtype=torch.float64), steps, burn)
        rows.append((g, lam, ls))
    return rows


def sal_run(n: int, g0: float, eta_step: float, chunk: int, updates: int, report_every: int, lyap_steps: int):
    """One-sided SAL, recurrent weights + bias, one update per ``chunk`` steps (averaged over them)."""
    torch.manual_seed(3)
    net = Autonomous(n, chunk).double()
    with torch.no_grad():
        net.cell.weight_hh.normal_(0, g0 / math.sqrt(n))
        net.cell.weight_ih.zero_()
        net.cell.bias_ih.zero_()
        net.cell.bias_hh.zero_()
    x = torch.zeros(chunk, 1, 1, dtype=torch.float64)
    h = (torch.rand(1, n, dtype=torch.float64) - 0.5)
    # The rule averages over the chunk's steps, so eta per update = eta per step * chunk (plain SGD, lr 1).
    model = instrument(net, (x, h), SALConfig(eta=eta_step * chunk, beta=0.99, recurrent_only=True)).train()
    model.get_parameter("cell.weight_ih").requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sal = fxwormhole.SAL(model)
    rows = []
    for u in range(updates + 1):
        if u % report_every == 0:
            W, b = model.get_parameter("cell.weight_hh").detach(), (model.get_parameter("cell.bias_hh") + model.get_parameter("cell.bias_ih")).detach()
            lam, ls = lyapunov_and_log_sensitivity(W, b, lyap_steps, lyap_steps // 5)
            probe = next(iter(sal.probes.values()))
            rows.append((u * chunk, lam, ls, float(W.norm(dim=1).mean()), float((probe.s_bar < 1).double().mean())))
        if u == updates:
            break
        opt.zero_grad()
        h = model(x, h)
        (0.0 * h.sum()).backward()  # no task loss: SAL alone
        opt.step()
        h = h.detach()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="long trajectories and a long SAL run")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eta", type=float, default=1e-3, help="SAL step per time step")
    ap.add_argument("--plot", default=None, help="save a plot of the gain table here (needs matplotlib)")
    args = ap.parse_args(argv)
    steps, updates, lyap = (3000, 600, 2000) if args.full else (600, 120, 400)
    gains = [0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0]
    table = gain_table(args.n, gains, steps, steps // 6)
    print(f"random tanh RNN, N={args.n}, {steps} steps")
    print(f"{'gain':>5} {'lambda_max':>11} {'log RMS s':>10}")
    for g, lam, ls in table:
        print(f"{g:5.1f} {lam:+11.3f} {ls:+10.3f}")
    rows = sal_run(args.n, 0.2, args.eta, 10, updates, updates // 6, lyap)
    print(f"\nSAL from g0=0.2 (one-sided, recurrent weights, eta={args.eta}/step, beta=0.99)")
    print(f"{'step':>6} {'lambda_max':>11} {'log RMS s':>10} {'mean|w|':>8} {'s_bar<1':>8}")
    for t, lam, ls, wn, below in rows:
        print(f"{t:6d} {lam:+11.3f} {ls:+10.3f} {wn:8.3f} {100 * below:7.1f}%")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([r[1] for r in table], [r[2] for r in table], "o-", label="random gains")
        ax.plot([r[1] for r in rows], [r[2] for r in rows], "s--", label="SAL trajectory")
        lim = [min(r[1] for r in table), max(r[1] for r in table)]
        ax.plot(lim, lim, "k:", lw=0.8)
        ax.set_xlabel("max Lyapunov exponent")
        ax.set_ylabel("log RMS sensitivity")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
    return table, rows


if __name__ == "__main__":
    main()
