"""One seeded training run of the adaptive-depth experiments, and its evaluation.

A run is described by a :class:`Run` (variant, depth, wormhole settings, costs) and produces a
dict of plain numbers: accuracy overall and per difficulty level, mean and per-level iterations,
Spearman rho(difficulty, iterations), steps that did not converge, and wall-clock per epoch.

Variants:

* ``plain``: the original feedforward model;
* ``tied``: the same cycle unrolled ``K`` times with shared weights (backprop through the unroll);
* ``worm``: the original model after :func:`fxwormhole.transform` with one wormhole; the fixed
  point is solved per sample to ``tol`` and differentiated implicitly. Optional costs:

  - ``fb``: ``lam_fb * mean_b ||z*_b|| / ||x_b||`` (the injected feedback, in the residual's units);
  - ``jac``: ``lam_jac * mean_b ||J_T(z*_b) v||^2`` (contraction regulariser, see probe.py);
  - ``ponder``: ``lam_ponder * mean_b iterations_b * ||z*_b|| / ||x_b||`` (feedback cost weighted by
    the iterations each sample actually spent).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
from scipy.stats import spearmanr

import fxwormhole
from fxwormhole import GradConfig, WormholeConfig

from models import WORMHOLE, ConvAdder, TiedAdder
from probe import TERMS, CycleProbe, penalty
from tasks import Addition

EPOCH_STEPS = 100  # one "epoch" = 100 steps of ``batch`` fresh samples


@dataclass
class Run:
    variant: str = "worm"          # plain | tied | worm
    K: int = 1                     # tied depth
    seed: int = 0
    steps: int = 3000
    batch: int = 64
    lr: float = 3e-3
    channels: int = 32
    bits: int = 11
    # wormhole (variant "worm")
    gate: str = "input"
    gate_init: float = -2.0
    proj_std: float = 0.1
    tol: float = 1e-3
    max_iter: int = 30
    solver: str = "picard"
    spectral_norm: bool = False
    grad: str = "implicit"          # implicit | jfb | phantom
    grad_tol: float = 1e-6          # adjoint tolerance (implicit); the library's default is 1e-6
    gate_cap: Optional[float] = None
    # costs
    lam_fb: float = 0.0
    lam_jac: float = 0.0
    lam_ponder: float = 0.0
    lam_first: float = 0.0
    clip: float = 0.0              # gradient-norm clipping (0: none)
    library: bool = False          # jac and first come from WormholeConfig(contraction=, compute_cost=), not the probe
    n_test_per_level: int = 100
    n_natural: int = 2000          # test samples from the natural distribution (random numbers)
    save: str = ""                 # write the trained state_dict here
    tag: str = ""

    def costs(self) -> dict:
        """The terms the probe adds to the loss (the library adds its own)."""
        return {name: getattr(self, f"lam_{name}") for name in TERMS
                if not (self.library and name in ("jac", "first"))}

    def label(self) -> str:
        if self.variant == "tied":
            return f"tied K={self.K}"
        if self.variant == "plain":
            return "plain"
        parts = ["worm"]
        if self.spectral_norm:
            parts.append("sn")
        if self.gate_cap:
            parts.append(f"cap{self.gate_cap:g}")
        if self.clip:
            parts.append(f"clip{self.clip:g}")
        if self.grad != "implicit" or self.grad_tol != 1e-6:
            parts.append(self.grad if self.grad != "implicit" else f"gtol{self.grad_tol:g}")
        for k in TERMS:
            if getattr(self, f"lam_{k}"):
                parts.append(f"{k}{getattr(self, f'lam_{k}'):g}")
        if self.library:
            parts.append("lib")
        return " ".join(parts) + (f" {self.tag}" if self.tag else "")


def build(run: Run, task: Addition, example: torch.Tensor) -> torch.nn.Module:
    if run.variant == "plain":
        return ConvAdder(task.in_channels, run.channels)
    if run.variant == "tied":
        return TiedAdder(run.K, task.in_channels, run.channels, run.gate_init, run.proj_std)
    cfg = WormholeConfig(wormholes=[WORMHOLE], gate=run.gate, gate_init=run.gate_init, proj_init="normal",
                         proj_std=run.proj_std, solver=run.solver, tol=run.tol, max_iter=run.max_iter,
                         on_fail="ignore", spectral_norm=run.spectral_norm, gate_cap=run.gate_cap,
                         grad=GradConfig(mode=run.grad, tol=run.grad_tol),
                         contraction=run.lam_jac if run.library else 0.0, compute_cost=run.lam_first if run.library else 0.0)
    return fxwormhole.transform(ConvAdder(task.in_channels, run.channels), (example,), cfg)


def iterations_of(run: Run, net: torch.nn.Module, probe: Optional[CycleProbe], n: int) -> torch.Tensor:
    if probe is None:
        return torch.full((n,), float(run.K if run.variant == "tied" else 1))
    return probe.iterations.float()


class Trainer:
    """A model of ``run`` with its probe and optimiser; :meth:`step` is one training step."""

    def __init__(self, run: Run, task: Addition, example: torch.Tensor) -> None:
        torch.manual_seed(run.seed)
        self.run, self.task = run, task
        self.net = build(run, task, example)
        self.probe = CycleProbe(self.net) if run.variant == "worm" else None
        self.opt = torch.optim.Adam(self.net.parameters(), lr=run.lr)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One optimiser step; returns the loss and, for wormholes, whether every forward and
        adjoint solve converged and the mean iterations."""
        net, probe, run = self.net, self.probe, self.run
        net.train()
        loss = self.task.loss(net(x), y)
        info = {}
        if probe is not None:
            info = {"converged": bool(probe.converged.all()), "it": float(probe.iterations.mean())}
            loss = loss + penalty(probe, run.costs())
        self.opt.zero_grad()
        loss.backward()
        if probe is not None:
            info["backward_converged"] = bool(probe.backward_converged.all())
        if run.clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), run.clip)
        self.opt.step()
        return info | {"loss": loss.item()}


def train(run: Run) -> dict:
    task = Addition(run.bits)
    rng = np.random.default_rng(run.seed)
    x_test, y_test, d_test = task.sample(run.n_test_per_level * len(task.levels), np.random.default_rng(10_000), per_level=True)
    natural = task.natural(run.n_natural, np.random.default_rng(20_000))
    trainer = Trainer(run, task, x_test[:4])
    step_s, infos, history = [], [], []
    for step in range(run.steps):
        x, y, _ = task.sample(run.batch, rng)
        t0 = time.perf_counter()
        info = trainer.step(x, y)
        step_s.append(time.perf_counter() - t0)
        infos.append(info)
        if step % 20 == 0:
            history.append((step, info["loss"], info.get("it")))
    if run.save:
        torch.save(trainer.net.state_dict(), run.save)
    bad = [i for i, info in enumerate(infos) if not info.get("converged", True)]
    its = [info["it"] for info in infos if "it" in info]
    net, probe = trainer.net, trainer.probe
    return evaluate(run, net, probe, task, x_test, y_test, d_test) | evaluate_natural(run, net, probe, task, *natural) | {
        "s_per_epoch": float(np.median(step_s)) * EPOCH_STEPS, "train_s": float(np.sum(step_s)),
        "bad_steps": len(bad), "first_bad_step": bad[0] if bad else None,
        "bad_backward_steps": sum(1 for info in infos if not info.get("backward_converged", True)),
        "history": history,
        "train_it_last": float(np.mean(its[-100:])) if its else float(run.K if run.variant == "tied" else 1),
    }


def evaluate(run: Run, net, probe, task, x, y, d) -> dict:
    net.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = net(x)
        eval_s = time.perf_counter() - t0
        it = iterations_of(run, net, probe, len(y))
        status_ok = probe.converged.float().mean().item() if probe else 1.0
        rate = probe.contraction_rate() if probe is not None else None
    correct = task.correct(logits, y).float()
    levels = task.levels
    rho = _rho(d, it)
    out = asdict(run) | {
        "label": run.label(), "acc": float(correct.mean()),
        "acc_lvl": [float(correct[d == l].mean()) for l in levels],
        "it_mean": float(it.mean()), "it_lvl": [float(it[d == l].mean()) for l in levels],
        "rho": rho, "rho_carry": _rho(task.carry_chain(x), it), "converged_frac": status_ok, "eval_s": eval_s,
    }
    if rate is not None:
        out["rate_lvl"] = [float(rate[d == l].mean()) for l in levels]
    net.train()
    return out


def _rho(d: torch.Tensor, it: torch.Tensor) -> float:
    return float(spearmanr(d.numpy(), it.numpy()).correlation) if it.std() > 0 else float("nan")


def evaluate_natural(run: Run, net, probe, task, x, y, d) -> dict:
    """Accuracy and iterations on uniformly random numbers (long carry chains are rare)."""
    net.eval()
    with torch.no_grad():
        correct = task.correct(net(x), y).float()
        it = iterations_of(run, net, probe, len(y))
    net.train()
    return {"nat_acc": float(correct.mean()), "nat_it": float(it.mean()), "nat_rho": _rho(d, it),
            "nat_rho_carry": _rho(task.carry_chain(x), it)}
