"""SAL against its rivals: deep tanh MLPs (depth 50/100/300) and long-lag tanh RNNs (lag 50/100/300).

One seeded command prints the comparison table (and, with ``--plot``, the curves):

    python examples/sal_compare.py --out compare.json --plot docs/figures/sal_compare.png
    python examples/sal_compare.py --quick          # a small version of every row (minutes)

Methods (every one on the same tasks, the same seeds and the same training budget):

* ``bp``       -- small random init (the SAL paper's start: s ~ 0.5), BP/BPTT only;
* ``sal``      -- the same start, BP/BPTT + SAL (``fxwormhole.instrument``, ``SALConfig``);
* ``spectral`` -- the SAL paper's baseline: every square weight rescaled to spectral radius rho
  before training, rho tuned on a separate tuning seed over a grid (``fxwormhole.init``);
* ``orthogonal`` -- orthogonal weights, zero biases (dynamical isometry; ``orthogonal_init_``);
* ``lsuv``     -- orthonormal pre-init + layer-sequential unit variance (MLP only: LSUV is defined
  for feed-forward stacks);
* ``flossing`` -- the small start, gradient flossing before training (and, for RNNs, every
  ``floss_every`` steps during training): Lyapunov exponents pushed to 0 through QR
  (``fxwormhole.lyapunov``; Engelken 2023).

Speed: the MLP seeds of one method train together as ONE block-diagonal network (each seed a
diagonal block; off-block gradients masked to 0, so the seeds stay independent: the SAL rule is
per neuron and a neuron's weight row has zeros outside its block). Time per step is measured
separately on one seed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxwormhole.config import SALConfig
from fxwormhole.init import lsuv_, orthogonal_init_, scale_spectral_radius_
from fxwormhole.instrument import instrument
from fxwormhole.lyapunov import chain_lyapunov_exponents, floss_, rnn_lyapunov_exponents
from fxwormhole.runtime.sensitivity import probes_of, sal_step

WIDTH = 16
TARGET = 0.95
FLOSS_LR = 1e-2  # Adam on the flossing loss: exponents from ~-0.7 to ~0 in 20-50 steps


# ==================================================================================== tasks
@dataclass(frozen=True)
class Task:
    """One row group of the table. ``kind`` is "mlp" (depth) or "rnn" (lag)."""

    name: str
    kind: str
    size: int  # depth or lag
    iters: int
    lr: float
    batch: int
    eval_every: int
    sal_eta_abs: float  # SAL's absolute step per update (separate_step: SALConfig.eta)
    rhos: Tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2, 1.5)
    floss_steps: int = 100  # flossing steps before training
    floss_every: int = 100  # RNN: floss_steps // 10 more flossing steps every n training steps (0: never)
    clip: float = 0.0  # per-seed gradient-norm clip (0: none)


def default_tasks(quick: bool) -> List[Task]:
    if quick:
        return [Task("depth 20", "mlp", 20, 300, 0.05, 128, 50, 5e-3, floss_steps=30, clip=1.0),
                Task("lag 20", "rnn", 20, 150, 0.05, 32, 25, 5e-3, floss_steps=30, floss_every=50, clip=1.0)]
    return [Task("depth 50", "mlp", 50, 1500, 0.05, 128, 50, 1e-3, clip=1.0),
            Task("depth 100", "mlp", 100, 2000, 0.01, 128, 50, 1e-3, clip=1.0),
            Task("depth 300", "mlp", 300, 1500, 0.003, 128, 50, 1e-3, clip=1.0),
            Task("lag 50", "rnn", 50, 1500, 0.05, 32, 50, 1e-3, clip=1.0),
            Task("lag 100", "rnn", 100, 1500, 0.05, 32, 50, 1e-3, clip=1.0),
            Task("lag 300", "rnn", 300, 1500, 0.05, 32, 50, 1e-3, clip=1.0)]


# ==================================================================================== MLP
def sal_config(task: "Task") -> SALConfig:
    """SAL as compared here: one-sided, target 1, and ``separate_step`` (its update stays out of
    ``.grad``, so the task-gradient clipping every method gets leaves SAL alone; ``eta`` is SAL's
    absolute step per update). See docs/sensitivity.md, "Depth 300"."""
    return SALConfig(eta=task.sal_eta_abs, separate_step=True)


def mlp_data(n: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 2-D linearly separable task: y = [x1 + x2 > 0], x uniform on [-1, 1]^2."""
    x = torch.rand(n, 2, generator=gen) * 2 - 1
    return x, (x.sum(1) > 0).float()


def small_mlp(depth: int, seed: int) -> nn.Sequential:
    """Width-16 tanh MLP with W ~ N(0, 0.25 / fan_in), b = 0 (every neuron's s ~ 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    layers: List[nn.Module] = []
    fan_in = 2
    for _ in range(depth):
        lin = nn.Linear(fan_in, WIDTH)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(WIDTH, fan_in, generator=gen) * 0.5 / math.sqrt(fan_in))
            lin.bias.zero_()
        layers += [lin, nn.Tanh()]
        fan_in = WIDTH
    out = nn.Linear(WIDTH, 1)
    with torch.no_grad():
        out.weight.copy_(torch.randn(1, WIDTH, generator=gen) * 0.1)
        out.bias.zero_()
    return nn.Sequential(*layers, out)


def hidden_linears(net: nn.Sequential) -> List[nn.Linear]:
    return [m for m in net if isinstance(m, nn.Linear)][:-1]


def init_mlp(method: str, depth: int, seed: int, rho: float = 1.0, floss_steps: int = 0) -> nn.Sequential:
    """A seed's network, initialised as ``method`` prescribes (before training)."""
    net = small_mlp(depth, seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    if method in ("orthogonal", "sal_orthogonal"):
        orthogonal_init_(net, generator=gen)
    elif method == "lsuv":
        x, _ = mlp_data(256, torch.Generator().manual_seed(20_000 + seed))
        lsuv_(net, (x,), generator=gen)
    elif method == "spectral":
        for lin in hidden_linears(net)[1:]:
            scale_spectral_radius_(lin.weight, rho)
    elif method == "flossing" and floss_steps:
        lins = hidden_linears(net)
        data = torch.Generator().manual_seed(30_000 + seed)
        floss_(net.parameters(), lambda: chain_lyapunov_exponents(lins, mlp_data(16, data)[0], k=WIDTH // 2,
                                                                  generator=data), floss_steps, lr=FLOSS_LR)
    return net


def mask_sal_updates(model: nn.Module, masks: Dict[int, torch.Tensor]) -> None:
    """``separate_step`` SAL updates of a packed model: zero their off-block entries too."""
    for probe in probes_of(model).values():
        for p, update in probe.sal_updates():
            if id(p) in masks:
                update.mul_(masks[id(p)])


class Packed:
    """Several width-16 MLPs trained as one block-diagonal MLP (one seed per diagonal block)."""

    def __init__(self, nets: Sequence[nn.Sequential]):
        self.n = len(nets)
        layers: List[nn.Module] = []
        self.masks: List[torch.Tensor] = []
        for i, m in enumerate(nets[0]):
            if isinstance(m, nn.Tanh):
                layers.append(nn.Tanh())
                continue
            blocks = [net[i] for net in nets]
            lin = nn.Linear(self.n * m.in_features, self.n * m.out_features, dtype=m.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.block_diag(*[b.weight for b in blocks]))
                lin.bias.copy_(torch.cat([b.bias for b in blocks]))
            self.masks.append(torch.block_diag(*[torch.ones_like(b.weight) for b in blocks]))
            layers.append(lin)
        self.net = nn.Sequential(*layers)

    def mask_grads(self, model: nn.Module) -> None:
        """Zero the off-block gradients and SAL updates: the seeds stay independent."""
        masks = {}
        for lin, mask in zip(self._linears(model), self.masks):
            masks[id(lin.weight)] = mask
            if lin.weight.grad is not None:
                lin.weight.grad.mul_(mask)
        mask_sal_updates(model, masks)

    def _linears(self, model: nn.Module) -> List[nn.Module]:
        return [model.get_submodule(str(i)) for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]

    def clip_per_seed(self, model: nn.Module, max_norm: float) -> None:
        """Per-seed gradient-norm clipping (the blocks' norms, not the packed model's)."""
        sq = torch.zeros(self.n)
        lins = self._linears(model)
        for lin in lins:
            g = lin.weight.grad
            sq += g.view(self.n, g.shape[0] // self.n, -1).square().sum((1, 2))
            sq += lin.bias.grad.view(self.n, -1).square().sum(1)
        scale = (max_norm / sq.sqrt().clamp_min(1e-12)).clamp(max=1.0)
        for lin in lins:
            lin.weight.grad.view(self.n, lin.weight.shape[0] // self.n, -1).mul_(scale.view(-1, 1, 1))
            lin.bias.grad.view(self.n, -1).mul_(scale.view(-1, 1))


@dataclass
class Curve:
    """One seed's run: test accuracy at the evaluation steps, plus diagnostics."""

    seed: int
    steps: List[int] = field(default_factory=list)
    acc: List[float] = field(default_factory=list)
    extra: Dict[str, List[float]] = field(default_factory=dict)


def forward_growth(model: nn.Module, packed: "Packed", x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per seed: the largest Lyapunov exponent of the layer chain of a Packed model at inputs ``x``
    (``[B, n * 2]``), from its diagonal blocks (see :func:`chain_growth`)."""
    lins = packed._linears(model)[:-1]
    n = packed.n
    weights = [lin.weight.view(n, lin.weight.shape[0] // n, n, -1).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
               for lin in lins]
    biases = [lin.bias.view(n, -1) for lin in lins]
    return chain_growth(weights, biases, x.view(x.shape[0], n, -1).transpose(0, 1), gen)


def chain_growth(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], x: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
    """Per group: mean over hidden layers of log ||J_l v|| for a renormalised random tangent v (the
    largest Lyapunov exponent of the tanh layer chain at these inputs; the same v for every group,
    so a group's value does not depend on its company). ``weights[l]``: ``[G, out,
    in]``, ``biases[l]``: ``[G, out]``, ``x``: ``[G, B, in]``."""
    with torch.no_grad():
        h = torch.tanh(torch.baddbmm(biases[0].unsqueeze(1), x, weights[0].transpose(1, 2)))
        v = torch.randn(h.shape[1:], generator=gen, dtype=h.dtype).expand_as(h)  # one tangent for every group
        v = v / v.norm(dim=2, keepdim=True)
        total = torch.zeros(h.shape[0], dtype=h.dtype)
        for w, b in zip(weights[1:], biases[1:]):
            h = torch.tanh(torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)))
            v = (1 - h * h) * torch.bmm(v, w.transpose(1, 2))
            n = v.norm(dim=2, keepdim=True).clamp_min(1e-300)
            total += n.log().mean(1).squeeze(1)
            v = v / n
        return total / (len(weights) - 1)


class Grouped(nn.Module):
    """Many width-16 MLPs -- any mix of methods, seeds and spectral radii -- as ONE batched MLP:
    layer l's weights form a ``[G, out, in]`` tensor and every group is one slice of a ``bmm``.

    The plain-BP methods (everything but SAL, whose probes need ``nn.Linear`` layers: it trains as
    :class:`Packed`) then train together for about the price of one network: at width 16 a step is
    bound by the number of ops, not by arithmetic. Groups share nothing (each slice's gradient is
    its own), so every group trains exactly as it would alone. Same interface as :class:`Packed`:
    input ``[B, G * 2]``, output ``[B, G]``.
    """

    def __init__(self, nets: Sequence[nn.Sequential]):
        super().__init__()
        self.n = len(nets)
        lins = [[m for m in net if isinstance(m, nn.Linear)] for net in nets]
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([ls[i].weight.detach() for ls in lins]))
                                        for i in range(len(lins[0])))
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([ls[i].bias.detach() for ls in lins]))
                                       for i in range(len(lins[0])))

    @property
    def net(self) -> nn.Module:
        """The Packed interface: the model to train (a property: a submodule would be a cycle)."""
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(x.shape[0], self.n, -1).transpose(0, 1)  # [G, B, in]
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < last:
                h = torch.tanh(h)
        return h.squeeze(2).T

    def growth(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return chain_growth(self.weights[:-1], self.biases[:-1], x.view(x.shape[0], self.n, -1).transpose(0, 1), gen)

    def mask_grads(self, model: nn.Module) -> None:
        """Nothing to mask: groups share no weights."""

    def clip_per_seed(self, model: nn.Module, max_norm: float) -> None:
        """Per-group gradient-norm clipping."""
        params = [*self.weights, *self.biases]
        sq = sum(p.grad.view(self.n, -1).square().sum(1) for p in params)
        scale = (max_norm / sq.sqrt().clamp_min(1e-12)).clamp(max=1.0)
        for p in params:
            p.grad.view(self.n, -1).mul_(scale.view(-1, 1))


def train_mlp(task: Task, method: str, seeds: Sequence[int], rho: float = 1.0, sal: Optional[SALConfig] = None,
              opt_name: str = "sgd", log: Callable[[str], None] = lambda s: None) -> List[Curve]:
    """Train every seed of ``method`` on the depth task (SAL: packed; otherwise grouped); test
    accuracy every eval_every steps. ``rho``: one value, or one per seed."""
    rhos = list(rho) if isinstance(rho, (list, tuple)) else [rho] * len(seeds)
    return train_mlp_groups(task, [(method, s, r) for s, r in zip(seeds, rhos)], sal, opt_name, log)


def train_mlp_groups(task: Task, groups: Sequence[Tuple[str, int, float]], sal: Optional[SALConfig] = None,
                     opt_name: str = "sgd", log: Callable[[str], None] = lambda s: None) -> List[Curve]:
    """Train ``(method, seed, rho)`` groups together, one curve each. SAL groups (all or none) train
    as one :class:`Packed` network under ``sal``; plain-BP groups of any methods as one
    :class:`Grouped` network. A group's data stream depends only on its seed."""
    use_sal = [m.startswith("sal") for m, _, _ in groups]
    if any(use_sal) and not all(use_sal):
        raise ValueError("train_mlp_groups: SAL and plain-BP groups train separately")
    nets = [init_mlp(m, task.size, s, r, task.floss_steps) for m, s, r in groups]
    seeds = [s for _, s, _ in groups]
    n = len(groups)
    packed = Packed(nets) if use_sal[0] else Grouped(nets)
    model = instrument(packed.net, (torch.zeros(4, 2 * n),), sal or sal_config(task)) if use_sal[0] else packed.net
    model.train()
    gens = [torch.Generator().manual_seed(40_000 + s) for s in seeds]
    xte, yte = mlp_data(2000, torch.Generator().manual_seed(123))
    xte_p = xte.repeat(1, n)
    opt = (torch.optim.SGD(model.parameters(), lr=task.lr) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=task.lr))
    diag_gen = torch.Generator().manual_seed(7)

    def evaluate():
        acc = ((model(xte_p) > 0).float() == yte[:, None]).float().mean(0)
        growth = (forward_growth(model, packed, xte_p[:128], diag_gen) if use_sal[0]
                  else packed.growth(xte_p[:128], diag_gen))
        return acc.tolist(), growth.tolist()

    def sample():
        batch = [mlp_data(task.batch, g) for g in gens]
        return torch.cat([b[0] for b in batch], 1), torch.stack([b[1] for b in batch], 1)

    label = "+".join(dict.fromkeys(m for m, _, _ in groups))
    return train_loop(task, label, packed, model, opt, seeds, sample, evaluate, "lyapunov", log=log)


def train_loop(task: Task, method: str, packed, model: nn.Module, opt: torch.optim.Optimizer, seeds: Sequence[int],
               sample: Callable[[], Tuple[torch.Tensor, torch.Tensor]], evaluate: Callable[[], Tuple[list, list]],
               extra: str, hook: Optional[Callable[[int], None]] = None,
               log: Callable[[str], None] = lambda s: None) -> List[Curve]:
    """The training loop both task kinds share: every seed's summed BCE, off-block gradients
    masked, optional per-seed clipping; ``evaluate()`` (no grad, eval mode) returns per-seed test
    accuracy and one diagnostic every ``eval_every`` steps."""
    curves = [Curve(s) for s in seeds]
    t0 = time.time()
    for it in range(task.iters + 1):
        if it % task.eval_every == 0 or it == task.iters:
            model.eval()
            with torch.no_grad():
                acc, diag = evaluate()
            model.train()
            for c, a, d in zip(curves, acc, diag):
                c.steps.append(it)
                c.acc.append(a)
                c.extra.setdefault(extra, []).append(d)
            log(f"    {method} it {it:5d} acc {' '.join(f'{a:.2f}' for a in acc)} "
                f"{extra} {' '.join(f'{d:+.3f}' for d in diag)} ({time.time() - t0:.0f}s)")
        if it == task.iters:
            break
        if hook is not None:
            hook(it)
        x, y = sample()
        opt.zero_grad(set_to_none=True)
        # the sum over seeds of each seed's mean BCE: seed s's parameters get exactly its own gradient
        loss = F.binary_cross_entropy_with_logits(model(x), y, reduction="sum") / task.batch
        loss.backward()
        packed.mask_grads(model)
        if task.clip:
            packed.clip_per_seed(model, task.clip)
        opt.step()
        sal_step(model)  # SAL with separate_step: its own update, after the optimizer's (no-op otherwise)
    return curves


# ==================================================================================== RNN
HIDDEN = 32


def lag_data(lag: int, batch: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """The long-lag task (our reading of the SAL paper's): a +-1 pulse on channel 0 at t = 0, zeros
    after it; the sign must be reported ``lag`` steps later (sequence length lag + 1)."""
    sign = torch.randint(0, 2, (batch,), generator=gen).float() * 2 - 1
    x = torch.zeros(lag + 1, batch, 2)
    x[0, :, 0] = sign
    return x, (sign > 0).float()


class LagNet(nn.Module):
    """Elman tanh RNN + linear read-out of the last state."""

    def __init__(self, n_in: int = 2, hidden: int = HIDDEN, n_out: int = 1):
        super().__init__()
        self.rnn = nn.RNN(n_in, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[-1])


def init_rnn(method: str, seed: int, rho: float = 1.0) -> LagNet:
    """Small start: W_hh ~ N(0, 0.25/H) (spectral radius ~0.5), default input weights, zero biases."""
    gen = torch.Generator().manual_seed(seed)
    net = LagNet()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(HIDDEN))
        net.rnn.weight_hh_l0.copy_(torch.randn(HIDDEN, HIDDEN, generator=gen) * 0.5 / math.sqrt(HIDDEN))
        net.rnn.bias_ih_l0.zero_()
        net.rnn.bias_hh_l0.zero_()
        if method == "spectral":
            scale_spectral_radius_(net.rnn.weight_hh_l0, rho)
        elif method in ("orthogonal", "sal_orthogonal"):
            torch.nn.init.orthogonal_(net.rnn.weight_hh_l0, generator=gen)
    return net


class PackedRNN:
    """Several LagNets as one block-diagonal LagNet (one seed per block; off-block grads masked)."""

    def __init__(self, nets: Sequence[LagNet]):
        self.n = len(nets)
        self.net = LagNet(2 * self.n, HIDDEN * self.n, self.n).to(nets[0].head.weight.dtype)
        self.masks: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in self.net.named_parameters():
                blocks = [n.get_parameter(name) for n in nets]
                if p.dim() == 2:
                    p.copy_(torch.block_diag(*blocks))
                    self.masks[name] = torch.block_diag(*[torch.ones_like(b) for b in blocks])
                else:
                    p.copy_(torch.cat(blocks))

    def mask_grads(self, model: nn.Module) -> None:
        masks = {}
        for name, mask in self.masks.items():
            p = model.get_parameter(name)
            masks[id(p)] = mask
            if p.grad is not None:
                p.grad.mul_(mask)
        mask_sal_updates(model, masks)

    def clip_per_seed(self, model: nn.Module, max_norm: float) -> None:
        params = [model.get_parameter(n) for n, _ in self.net.named_parameters()]
        sq = torch.zeros(self.n)
        for p in params:
            sq += p.grad.view(self.n, -1).square().sum(1)  # rows of seed s are block s (off-block is 0)
        scale = (max_norm / sq.sqrt().clamp_min(1e-12)).clamp(max=1.0)
        for p in params:
            p.grad.view(self.n, -1).mul_(scale.view(-1, 1))

    def exponents(self, model: nn.Module, x: torch.Tensor, k: int, transient: int,
                  gen: torch.Generator) -> torch.Tensor:
        """Per seed Lyapunov exponents ``[B, S, k]`` of the packed RNN (its Jacobian is block-diagonal)."""
        from fxwormhole.lyapunov import lyapunov_exponents

        S, H = self.n, HIDDEN
        w_ih, w_hh = model.get_parameter("rnn.weight_ih_l0"), model.get_parameter("rnn.weight_hh_l0")
        b = model.get_parameter("rnn.bias_ih_l0") + model.get_parameter("rnn.bias_hh_l0")
        blocks = torch.stack([w_hh[s * H:(s + 1) * H, s * H:(s + 1) * H] for s in range(S)])  # [S, H, H]
        drive = x @ w_ih.T + b
        state = {"h": torch.zeros(x.shape[1], S * H, dtype=w_hh.dtype)}

        def steps():
            for t in range(x.shape[0]):
                state["h"] = torch.tanh(drive[t] + state["h"] @ w_hh.T)
                d = (1 - state["h"] ** 2).view(-1, S, H, 1)
                yield lambda q, d=d: d * (blocks @ q)

        q0 = torch.linalg.qr(torch.randn(x.shape[1], S, H, k, generator=gen, dtype=w_hh.dtype))[0]
        return lyapunov_exponents(steps(), q0, transient)


class RNNFlosser:
    """Gradient flossing of a packed RNN: Adam on each seed's mean squared Lyapunov exponent (the
    ``HIDDEN // 2`` largest), along one task sequence per seed, through the QR steps."""

    def __init__(self, packed: PackedRNN, model: nn.Module, lag: int, seeds: Sequence[int]):
        self.packed, self.model, self.lag = packed, model, lag
        self.opt = torch.optim.Adam(model.parameters(), lr=FLOSS_LR)
        self.data = [torch.Generator().manual_seed(50_000 + s) for s in seeds]  # not the training stream
        self.frames = torch.Generator().manual_seed(60_000 + seeds[0])

    def floss(self, steps: int) -> None:
        for _ in range(steps):
            x = torch.cat([lag_data(self.lag, 1, g)[0] for g in self.data], 2)
            lams = self.packed.exponents(self.model, x, HIDDEN // 2, min(10, self.lag // 5), self.frames)
            self.opt.zero_grad(set_to_none=True)
            lams.square().mean(dim=(0, 2)).sum().backward()  # the sum of every seed's own flossing loss
            self.packed.mask_grads(self.model)
            self.opt.step()


def train_rnn(task: Task, method: str, seeds: Sequence[int], rho: float = 1.0, sal: Optional[SALConfig] = None,
              log: Callable[[str], None] = lambda s: None) -> List[Curve]:
    """Train every seed of ``method`` on the lag task (packed); test accuracy every eval_every steps."""
    rhos = list(rho) if isinstance(rho, (list, tuple)) else [rho] * len(seeds)
    packed = PackedRNN([init_rnn(method, s, r) for s, r in zip(seeds, rhos)])
    n, lag = len(seeds), task.size
    gens = [torch.Generator().manual_seed(40_000 + s) for s in seeds]
    xte, yte = lag_data(lag, 500, torch.Generator().manual_seed(123))
    xte_p = xte.repeat(1, 1, n)
    use_sal = method.startswith("sal")
    model = instrument(packed.net, (xte_p[:, :4],), sal or sal_config(task)).train() if use_sal else packed.net.train()
    opt = torch.optim.SGD(model.parameters(), lr=task.lr)
    flosser = RNNFlosser(packed, model, lag, seeds) if method == "flossing" else None
    if flosser is not None:
        flosser.floss(task.floss_steps)
    H = HIDDEN

    def evaluate():
        acc = ((model(xte_p) > 0).float() == yte[:, None]).float().mean(0)
        w = model.get_parameter("rnn.weight_hh_l0")
        return acc.tolist(), [float(torch.linalg.eigvals(w[s * H:(s + 1) * H, s * H:(s + 1) * H]).abs().max())
                              for s in range(n)]

    def sample():
        batch = [lag_data(lag, task.batch, g) for g in gens]
        return torch.cat([b[0] for b in batch], 2), torch.stack([b[1] for b in batch], 1)

    def hook(it: int) -> None:  # flossing interleaved with training
        if flosser is not None and task.floss_every and it and it % task.floss_every == 0:
            flosser.floss(max(1, task.floss_steps // 10))

    return train_loop(task, method, packed, model, opt, seeds, sample, evaluate, "rho", hook, log)


# ==================================================================================== driver
MLP_METHODS = ("bp", "sal", "spectral", "orthogonal", "lsuv", "flossing")
RNN_METHODS = ("bp", "sal", "spectral", "orthogonal", "flossing")


def first_reach(c: Curve) -> Optional[int]:
    """First training step (not the initial evaluation) with test accuracy >= TARGET."""
    return next((s for s, a in zip(c.steps, c.acc) if s > 0 and a >= TARGET), None)


@dataclass
class Row:
    """One (task, method) cell of the table: every seed's curve and the summary."""

    task: str
    method: str
    rho: Optional[float]
    curves: List[Curve]
    ms_per_step: float
    setup_s: float = 0.0
    tuning_runs: int = 0

    def held(self, c: Curve) -> bool:
        """At or above the target at every evaluation of the last quarter of the run."""
        tail = c.acc[len(c.acc) - max(1, len(c.acc) // 4):]
        return min(tail) >= TARGET

    def summary(self) -> Dict[str, object]:
        finals = [c.acc[-1] for c in self.curves]
        reach = [first_reach(c) for c in self.curves]
        reached = [r for r in reach if r is not None]
        return {"task": self.task, "method": self.method + (f" (rho {self.rho:g})" if self.rho is not None else ""),
                "steps": self.curves[0].steps[-1], "held": sum(self.held(c) for c in self.curves), "seeds": len(self.curves),
                "reached": len(reached), "steps_to_target": statistics.median(reached) if reached else None,
                "final_mean": statistics.mean(finals), "final_sd": statistics.pstdev(finals),
                "ms_per_step": self.ms_per_step, "setup_s": self.setup_s, "tuning_runs": self.tuning_runs}


def run_method(task: Task, method: str, seeds: Sequence[int], rho=1.0, log=print) -> List[Curve]:
    """``rho``: one value, or one per seed (the tuning run packs the whole grid on one seed)."""
    train = train_mlp if task.kind == "mlp" else train_rnn
    return train(task, method, seeds, rho=rho, log=log)


def tune_rho(task: Task, tune_seed: int, log=print) -> float:
    """The spectral baseline's hand tuning: the whole grid on a separate seed, the full budget."""
    curves = run_method(task, "spectral", [tune_seed] * len(task.rhos), list(task.rhos), log=lambda s: None)
    return pick_rho(task, curves, log)


def pick_rho(task: Task, tuning: Sequence[Curve], log=print) -> float:
    """The grid point (one curve per ``task.rhos``) with the best final accuracy (ties: the
    earliest to reach the target)."""
    scores = []
    for rho, c in zip(task.rhos, tuning):
        reach = first_reach(c) or task.iters + 1
        scores.append((round(c.acc[-1], 3), -reach, rho))
        log(f"  tune {task.name}: rho {rho:g} -> final acc {c.acc[-1]:.3f}, reached {TARGET} at {reach}")
    return max(scores)[2]


def run_plain_mlp(task: Task, methods: Sequence[str], seeds: Sequence[int], tune_seed: int,
                  log=print) -> Tuple[Dict[str, List[Curve]], Optional[float]]:
    """Every plain-BP method of a depth task in ONE :class:`Grouped` run. The spectral baseline trains
    its whole radius grid on the tuning seed and on every seed at once, and reports the seeds' curves
    at the radius the tuning seed picks: the same numbers as tuning first and training after, as
    the groups are independent. Returns the curves per method and the tuned radius (or None)."""
    groups: List[Tuple[str, int, float]] = []
    for m in methods:
        if m == "spectral":
            groups += [(m, tune_seed, r) for r in task.rhos] + [(m, s, r) for r in task.rhos for s in seeds]
        else:
            groups += [(m, s, 1.0) for s in seeds]
    curves = train_mlp_groups(task, groups, log=log)
    out: Dict[str, List[Curve]] = {}
    rho = None
    for m in methods:
        mine = [(g, c) for g, c in zip(groups, curves) if g[0] == m]
        if m == "spectral":
            rho = pick_rho(task, [c for g, c in mine[:len(task.rhos)]], log)
            mine = [(g, c) for g, c in mine[len(task.rhos):] if g[2] == rho]
        out[m] = [c for _, c in mine]
    return out, rho


def time_per_step(task: Task, method: str, rho: float, reps: int = 10) -> float:
    """Median CPU time (ms, this thread's clock: robust to other jobs on a shared machine) of one
    training step of ONE seed's network (1 thread)."""
    if task.kind == "mlp":
        net = init_mlp(method, task.size, 0, rho, 0)
        x, y = mlp_data(task.batch, torch.Generator().manual_seed(0))
        y = y[:, None]
    else:
        net = init_rnn(method, 0, rho)
        x, y = lag_data(task.size, task.batch, torch.Generator().manual_seed(0))
        y = y[:, None]
    model = instrument(net, (x,), sal_config(task)).train() if method.startswith("sal") else net
    opt = torch.optim.SGD(model.parameters(), lr=task.lr)
    times = []
    for i in range(reps + 2):
        t = time.thread_time()
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
        sal_step(model)
        if i >= 2:
            times.append(time.thread_time() - t)
    return 1000 * statistics.median(times)


def setup_seconds(task: Task, method: str, rho: float) -> float:
    """CPU seconds one seed's network needs before training (init, LSUV passes, flossing)."""
    t = time.thread_time()
    if task.kind == "mlp":
        init_mlp(method, task.size, 0, rho, task.floss_steps)
    else:
        net = init_rnn(method, 0, rho)
        if method == "flossing":
            packed = PackedRNN([net])
            RNNFlosser(packed, packed.net, task.size, [0]).floss(task.floss_steps)
    return time.thread_time() - t


def format_table(rows: List[Dict[str, object]]) -> str:
    head = ("task", "method", "steps", f"held >= {TARGET}", f"reached {TARGET}", "steps to target", "final acc",
            "CPU ms/step", "setup CPU s")
    body = []
    for r in rows:
        steps = "-" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}"
        setup = f"{r['setup_s']:.1f}" + (f" + tuning ({r['tuning_runs']} runs)" if r.get("tuning_runs") else "")
        body.append((r["task"], r["method"], str(r.get("steps", "?")), f"{r['held']}/{r['seeds']}", f"{r['reached']}/{r['seeds']}", steps,
                     f"{r['final_mean']:.3f} +- {r['final_sd']:.3f}", f"{r['ms_per_step']:.1f}", setup))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in (head, *body)]
    return "\n".join(["| " + lines[0] + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + ["| " + ln + " |" for ln in lines[1:]])


def plot(results: Dict[str, Dict[str, object]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    cols = 3
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = {"bp": "tab:gray", "sal": "tab:red", "spectral": "tab:blue", "orthogonal": "tab:green",
              "lsuv": "tab:purple", "flossing": "tab:orange"}
    for ax, task in zip(axes.flat, tasks):
        for method, rec in results[task].items():
            curves = rec["curves"]
            steps = curves[0]["steps"]
            accs = torch.tensor([c["acc"] for c in curves])
            color = colors.get(method.split(" ")[0], None)
            for a in accs:
                ax.plot(steps, a, color=color, alpha=0.15, lw=0.8)
            ax.plot(steps, accs.median(0).values, color=color, lw=1.8, label=method)
        ax.axhline(TARGET, color="k", ls=":", lw=0.8)
        ax.set_title(task)
        lowest = min(min(c["acc"]) for rec in results[task].values() for c in rec["curves"])
        ax.set_ylim(-0.02 if lowest < 0.4 else 0.4, 1.02)  # an RNN's read-out can flip to 0 accuracy
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("median over seeds (thick) and each seed (thin)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny tasks (minutes): checks that every row runs")
    ap.add_argument("--tasks", default=None, help="comma-separated task names, e.g. 'depth 50,lag 100'")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--iters", type=int, default=None, help="training steps of every selected task (default: the "
                                                            "task's own budget; a shared machine may need fewer)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--tune-seed", type=int, default=100, help="seed on which the spectral radius is tuned")
    ap.add_argument("--out", default=None, help="write every curve here (JSON)")
    ap.add_argument("--load", default=None, help="print/plot previous --out file(s) (comma-separated: merged) "
                                                "instead of training")
    ap.add_argument("--plot", default=None, help="save the accuracy curves here (PNG; needs matplotlib)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.load:
        saved = {"rows": [], "curves": {}}
        for path in args.load.split(","):
            with open(path) as f:
                part = json.load(f)
            saved["rows"] += part["rows"]
            for task, methods in part["curves"].items():
                saved["curves"].setdefault(task, {}).update(methods)
        for row in saved["rows"]:  # files from before the steps column: the curves know
            if "steps" not in row:
                row["steps"] = saved["curves"][row["task"]][row["method"]]["curves"][0]["steps"][-1]
        order = {t.name: i for i, t in enumerate(default_tasks(False))}
        methods = {m: i for i, m in enumerate(MLP_METHODS)}
        saved["rows"].sort(key=lambda r: (order.get(r["task"], len(order)), methods.get(r["method"].split(" ")[0], 99)))
    else:
        saved = {"rows": [], "curves": {}}
        seeds = [int(s) for s in args.seeds.split(",")]
        tasks = default_tasks(args.quick)
        if args.tasks:
            wanted = [t.strip() for t in args.tasks.split(",")]
            tasks = [t for t in tasks if t.name in wanted]
        if args.iters:
            tasks = [replace(t, iters=args.iters) for t in tasks]
        for task in tasks:
            methods = MLP_METHODS if task.kind == "mlp" else RNN_METHODS
            if args.methods:
                methods = [m for m in args.methods.split(",") if m in methods]
            plain, tuned = {}, None
            bp_methods = [m for m in methods if not m.startswith("sal")]
            if task.kind == "mlp" and bp_methods:  # every plain-BP method in one grouped run
                log(f"{task.name}: " + ", ".join(bp_methods))
                plain, tuned = run_plain_mlp(task, bp_methods, seeds, args.tune_seed, log)
            for method in methods:
                if method in plain:
                    curves, rho = plain[method], (tuned if method == "spectral" else None)
                else:
                    rho = tune_rho(task, args.tune_seed, log) if method == "spectral" else None
                    log(f"{task.name}: {method}" + (f" (rho {rho:g})" if rho is not None else ""))
                    curves = run_method(task, method, seeds, rho if rho is not None else 1.0, log=log)
                row = Row(task.name, method, rho, curves, time_per_step(task, method, rho or 1.0),
                          setup_seconds(task, method, rho or 1.0), len(task.rhos) if method == "spectral" else 0)
                saved["rows"].append(row.summary())
                saved["curves"].setdefault(task.name, {})[row.summary()["method"]] = {
                    "curves": [asdict(c) for c in curves]}
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(saved, f)
    print(format_table(saved["rows"]))
    if args.plot:
        plot(saved["curves"], args.plot)
    return saved


if __name__ == "__main__":
    main()
