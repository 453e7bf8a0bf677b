"""Wormhole transform: overhead when closed, and easy vs hard inputs when open.

Run:  python bench/bench_wormhole.py [--repeats 30]

1. Overhead (the seed paper's "cheap when inactive"): original model vs the transformed model with
   gates closed (as after ``transform``), batch 64, MLP and CNN; forward and forward+backward wall
   time, measured alternately in one process (medians). Goals: forward <= 1.15x,
   forward+backward <= 1.3x.
2. Easy vs hard inputs: an MLP transformed with an input-dependent gate whose logit grows with the
   source activation's mean; "easy" inputs keep it nearly closed, "hard" ones open it. Mean
   per-sample forward iterations and wall time for a batch of each.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxwormhole as fw
from fxwormhole import zoo


def _median_time(fn, repeats: int) -> float:
    """Median CPU time of the calling thread per call.

    torch runs single-threaded here (set in main), so thread CPU time is the cost of the call and,
    unlike wall time, does not count the time the process spends descheduled on a shared machine.
    """
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def _alternate(fns: dict, repeats: int, rounds: int = 5) -> dict:
    """Interleave the candidates round by round so machine noise hits all of them alike."""
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(_median_time(fn, max(1, repeats // rounds)))
    return {k: statistics.median(v) for k, v in samples.items()}


def overhead(repeats: int) -> list[tuple]:
    rows = []
    models = {
        "MLP 4x512": (zoo.MLP(in_features=256, hidden=512, depth=4, out_features=10), (torch.randn(64, 256),)),
        "CNN 16ch 32px": (zoo.CNN(in_channels=3, channels=16, size=32, hidden=128, classes=10), (torch.randn(64, 3, 32, 32),)),
    }
    for name, (model, inputs) in models.items():
        net = fw.transform(model, inputs)
        model.train(), net.train()

        def fwd(m):
            def run():
                with torch.no_grad():
                    m(*inputs)
            return run

        def fwd_bwd(m):
            def run():
                m(*inputs).sum().backward()
            return run

        for _ in range(3):  # warm up both
            fwd(model)(), fwd(net)(), fwd_bwd(model)(), fwd_bwd(net)()
        t = _alternate({"orig_f": fwd(model), "fw_f": fwd(net), "orig_fb": fwd_bwd(model), "fw_fb": fwd_bwd(net)}, repeats)
        its = net.fixed_point_stats()["fixed_point_0"].forward.mean_iterations
        rows.append((name, t["orig_f"] * 1e3, t["fw_f"] * 1e3, t["fw_f"] / t["orig_f"],
                     t["orig_fb"] * 1e3, t["fw_fb"] * 1e3, t["fw_fb"] / t["orig_fb"], its))
    return rows


def easy_vs_hard(repeats: int) -> list[tuple]:
    """An input gate that opens along one direction of the source activation.

    ``h_d`` is the deep layer's activation for a prototype input ``d``. The gate's logit is
    ``gate_init + c <h, h_d> / ||h_d||^2``: inputs near ``d`` (hard) open the wormhole, inputs near
    ``-d`` (easy) keep it shut. Both batches run through the same transformed model.
    """
    torch.manual_seed(0)
    model = zoo.MLP(in_features=64, hidden=256, depth=4, out_features=10)
    d = torch.randn(1, 64) * 2.0
    cfg = fw.WormholeConfig(wormholes=[("layers.3", "layers.0")], gate="input", gate_init=-6.0,
                            proj_init="normal", proj_std=0.05, solver="picard", tol=1e-5, max_iter=100)
    net = fw.transform(model, (d.expand(64, 64).clone(),), cfg).eval()
    with torch.no_grad():
        h = d
        for layer in model.layers:
            h = torch.tanh(layer(h))
        gate = net.get_submodule("fixed_point_0.feedback.wormhole_0.gate")
        weight = gate.map.map.weight  # [dst features, src features]
        weight.copy_((10.0 * h / h.square().sum()).expand_as(weight))
    easy = -d + 0.3 * torch.randn(64, 64)
    hard = d + 0.3 * torch.randn(64, 64)
    results = []
    for label, batch in (("easy", easy), ("hard", hard), ("mixed 90/10", torch.cat([easy[:58], hard[:6]]))):
        def run(b=batch):
            with torch.no_grad():
                net(b)
        run()
        stats = net.fixed_point_stats()["fixed_point_0"].forward
        t = _median_time(run, repeats)
        results.append((label, stats.mean_iterations, int(stats.iterations.max()), t * 1e3))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)  # see _median_time

    print("Overhead with closed wormholes (batch 64, 1 thread, medians of alternating runs, CPU ms)")
    print(f"{'model':<14} {'orig fwd':>9} {'fxw fwd':>9} {'ratio':>6} {'orig f+b':>9} {'fxw f+b':>9} {'ratio':>6} {'iters':>6}")
    for r in overhead(args.repeats):
        print(f"{r[0]:<14} {r[1]:9.2f} {r[2]:9.2f} {r[3]:6.2f} {r[4]:9.2f} {r[5]:9.2f} {r[6]:6.2f} {r[7]:6.2f}")
    print("\nEasy vs hard inputs (input gate, picard, tol 1e-5, batch 64, CPU ms)")
    print(f"{'batch':<12} {'mean iters':>10} {'max iters':>9} {'time ms':>8}")
    for r in easy_vs_hard(args.repeats):
        print(f"{r[0]:<12} {r[1]:10.2f} {r[2]:9d} {r[3]:8.2f}")


if __name__ == "__main__":
    main()
