"""fxwormhole FixedPoint vs TorchDEQ vs a bare hand-written loop (forward + implicit backward).

Same f (tanh MLP equilibrium layer z = tanh(W z + U x + b), width 256, batch 64, ||W||_2 = 0.9),
same tolerance (relative, per sample, 1e-5 forward and backward) and max_iter, same solver family
(TorchDEQ fixed_point_iter vs picard; TorchDEQ anderson vs anderson). The three are ALTERNATED in
one process (round-robin) so that machine noise hits all of them alike.

    python bench/bench_vs_torchdeq.py [--rounds 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from fxwormhole.config import GradConfig, SolverConfig
from fxwormhole.runtime.fixed_point import FixedPoint

WIDTH, BATCH, TOL, MAX_ITER = 256, 64, 1e-5, 100


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.W, self.U = nn.Linear(WIDTH, WIDTH, bias=False), nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            self.W.weight.mul_(0.9 / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


def bare(layer, x, g):
    """The floor: plain iteration to per-sample rel tol, then the adjoint w = J^T w + g."""
    params = list(layer.parameters())
    with torch.no_grad():
        z = torch.zeros_like(x)
        for _ in range(MAX_ITER):
            zn = layer(z, x)
            r = ((zn - z).norm(dim=1) / (zn.norm(dim=1) + 1e-12)).max()
            z = zn
            if r.item() <= TOL:
                break
    z = z.requires_grad_()
    fz = layer(z, x)
    w = g
    for _ in range(MAX_ITER):
        wn = torch.autograd.grad(fz, z, w, retain_graph=True)[0] + g
        r = ((wn - w).norm(dim=1) / (wn.norm(dim=1) + 1e-12)).max()
        w = wn
        if r.item() <= TOL:
            break
    return torch.autograd.grad(fz, [x, *params], w)


def ours(node):
    def run(layer, x, g):
        y = node(x)
        return torch.autograd.grad(y, [x, *layer.parameters()], g)
    return run


def torchdeq_runner(solver):
    from torchdeq import get_deq
    deq = get_deq(f_solver=solver, b_solver="fixed_point_iter", f_max_iter=MAX_ITER, b_max_iter=MAX_ITER,
                  f_tol=TOL, b_tol=TOL, f_stop_mode="rel", b_stop_mode="rel", ift=True)

    def run(layer, x, g):
        z_out, _ = deq(lambda z: layer(z, x), torch.zeros_like(x))
        return torch.autograd.grad(z_out[-1], [x, *layer.parameters()], g)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared 2-core machine OpenMP spinning "
                         "under load made every op 50-100x slower and the timings meaningless)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = Layer()
    x = torch.randn(BATCH, WIDTH, requires_grad=True)
    g = torch.randn(BATCH, WIDTH)
    grad = GradConfig(tol=TOL, max_iter=MAX_ITER)
    runners = {
        "bare loop (picard + adjoint)": bare,
        "fxwormhole picard": ours(FixedPoint(layer, solver=SolverConfig(name="picard", tol=TOL, max_iter=MAX_ITER), grad=grad)),
        "fxwormhole anderson": ours(FixedPoint(layer, solver=SolverConfig(name="anderson", tol=TOL, max_iter=MAX_ITER), grad=grad)),
    }
    try:
        import torchdeq  # noqa: F401
        runners["torchdeq fixed_point_iter"] = torchdeq_runner("fixed_point_iter")
        runners["torchdeq anderson"] = torchdeq_runner("anderson")
    except Exception as e:  # noqa: BLE001 - report and run the rest
        print(f"torchdeq unavailable ({type(e).__name__}: {e}); timing the rest only")
    ref = bare(layer, x, g)
    for name, run in runners.items():  # warm up + check every runner computes the same gradient
        out = run(layer, x, g)
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(out, ref))
        print(f"{name:32s} max rel grad diff vs bare: {err:.2e}")
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            t = time.perf_counter()
            run(layer, x, g)
            times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, width {WIDTH}, batch {BATCH}, "
          f"tol {TOL}, rounds {args.rounds} (median s per forward+backward)")
    print(f"{'runner':32s} {'s/call':>9s} {'x bare':>7s} {'x torchdeq same family':>24s}")
    for name, t in med.items():
        fam = None
        if name == "fxwormhole picard":
            fam = med.get("torchdeq fixed_point_iter")
        elif name == "fxwormhole anderson":
            fam = med.get("torchdeq anderson")
        rel = f"{t / fam:.3f}" if fam else "-"
        print(f"{name:32s} {t:9.4f} {t / med['bare loop (picard + adjoint)']:7.2f} {rel:>24s}")


if __name__ == "__main__":
    main()
