"""Fixed-point solvers, registered by name.

A solver maps the current iterate ``z`` and its image ``f(z)`` to the next iterate. Solvers are
*functional*: every piece of state is a tensor whose dim 0 is the batch, so the same code runs

* in eager mode, where the runtime drops converged samples by indexing every state tensor
  (per-sample halting that actually saves compute), and
* inside ``torch.while_loop`` under ``torch.compile``, where shapes are fixed and converged samples
  are frozen with ``torch.where``.

Iterates are flat: ``z`` and ``fz`` are ``[b, D]`` (the runtime flattens tuple/feature-map states).

Built-ins: ``picard`` (``z <- f(z)``), ``damped`` (``z <- (1-d) z + d f(z)``), ``anderson``
(type-II Anderson acceleration with memory ``m``, Tikhonov regularisation relative to the history's
scale, and mixing ``damping``; its small ``(m+1)x(m+1)`` solves run in float32 for half-precision
states and in float64 for float64 states).

Register your own::

    class Mine(FixedPointSolver):
        def init(self, z): return ()
        def step(self, state, z, fz): return 0.5 * (z + fz), state
    register_solver("mine", Mine)          # a class or any factory(config) -> solver
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ..config import SolverConfig
from ..errors import ConfigError

__all__ = [
    "FixedPointSolver",
    "Picard",
    "Damped",
    "Anderson",
    "register_solver",
    "get_solver",
    "make_solver",
    "available_solvers",
]

State = Tuple[Tensor, ...]


class FixedPointSolver:
    """Base class: a stateless Picard step. Subclasses override :meth:`init` and :meth:`step`.

    Contract: ``init(z)`` returns a tuple of tensors with batch dim 0 (possibly empty);
    ``step(state, z, fz)`` returns ``(z_next, new_state)`` with the same shapes. Both must be
    traceable by ``torch.compile`` (no data-dependent Python control flow) to run compiled.

    A solver may set ``fallback_rate``: while a sample's residual falls by at least that factor per
    evaluation the loops take :meth:`fallback_step` for it and keep no history (acceleration
    would buy nothing there); once it falls more slowly the sample is accelerated from a fresh
    ``init`` state for the rest of the solve. ``None`` (the default) always uses :meth:`step`.
    """

    fallback_rate: Optional[float] = None

    def __init__(self, config: SolverConfig | None = None) -> None:
        self.config = config if config is not None else SolverConfig()

    def init(self, z: Tensor) -> State:
        return ()

    def step(self, state: State, z: Tensor, fz: Tensor) -> Tuple[Tensor, State]:
        return fz, state

    def fallback_step(self, z: Tensor, fz: Tensor) -> Tensor:
        """The plain (damped) step taken while acceleration is not worth it."""
        d = float(self.config.damping)
        return fz if d == 1.0 else torch.lerp(z, fz, d)

    def first_step(self, state: State, z: Tensor, fz: Tensor) -> Tuple[Tensor, State]:
        """:meth:`step` from a fresh ``init`` state (a sample just switched to acceleration); a
        solver may compute it more cheaply, with the same result."""
        return self.step(state, z, fz)


class Picard(FixedPointSolver):
    """Plain iteration ``z <- f(z)``."""


class Damped(FixedPointSolver):
    """Relaxed iteration ``z <- (1 - d) z + d f(z)`` with ``d = config.damping``."""

    def step(self, state: State, z: Tensor, fz: Tensor) -> Tuple[Tensor, State]:
        return self.fallback_step(z, fz), state


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    # The least-squares system is tiny but badly conditioned: never solve it in half precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _solve(A: Tensor, b: Tensor) -> Tensor:
    """``A x = b``. On a GPU without the singularity check, which would read the device (a stream
    sync) at every solver step; ``A`` is regularised, so it is never singular."""
    if A.device.type == "cpu":
        return torch.linalg.solve(A, b)
    return torch.linalg.solve_ex(A, b)[0]


def spd_solve_unrolled(A: Tensor, b: Tensor) -> Tensor:
    """Solve ``A x = b`` for a batch of small symmetric positive definite ``A`` ([n, m, m], b
    [n, m]) by a Cholesky factorisation unrolled over ``m`` into elementwise ops on [n] vectors.

    For ``torch.compile``: it needs no LAPACK call and no in-place slice writes (neither works
    inside a ``torch.while_loop`` body), and Inductor fuses it into one kernel. Pivots are floored
    at a tiny multiple of the diagonal's scale, so a singular ``A`` gives a finite answer."""
    m = A.shape[-1]
    floor = A.diagonal(dim1=1, dim2=2).abs().amax(1) * torch.finfo(A.dtype).eps + torch.finfo(A.dtype).tiny
    L = [[None] * m for _ in range(m)]
    for j in range(m):
        s = A[:, j, j] - sum((L[j][k] * L[j][k] for k in range(j)), torch.zeros_like(floor))
        L[j][j] = torch.sqrt(torch.maximum(s, floor))
        for i in range(j + 1, m):
            t = A[:, i, j] - sum((L[i][k] * L[j][k] for k in range(j)), torch.zeros_like(floor))
            L[i][j] = t / L[j][j]
    y = []
    for i in range(m):  # L y = b
        y.append((b[:, i] - sum((L[i][k] * y[k] for k in range(i)), torch.zeros_like(floor))) / L[i][i])
    x = [None] * m
    for i in reversed(range(m)):  # L^T x = y
        x[i] = (y[i] - sum((L[k][i] * x[k] for k in range(i + 1, m)), torch.zeros_like(floor))) / L[i][i]
    return torch.stack(x, 1)


class Anderson(FixedPointSolver):
    """Type-II Anderson acceleration with a fixed-size (ring) history of ``m = config.memory``.

    With ``G_i = f(x_i) - x_i`` over the valid history slots, solve per sample
    ``min_alpha ||sum_i alpha_i G_i||^2 + lam * s * ||alpha||^2  s.t.  sum_i alpha_i = 1``
    (``s`` = mean of ``||G_i||^2``, so ``lam = config.regularization`` is scale free), then
    ``z_next = d * sum_i alpha_i f(x_i) + (1 - d) * sum_i alpha_i x_i``.

    Cost per step: the Gram matrix ``H = G G^T`` is updated by one row and column (``m`` dot
    products, not ``m^2``), the history by one slot, and no iterate history is stored
    (``x_i = f(x_i) - G_i``). Unused slots are zero, so they drop out of ``H`` and shapes never
    change (the same code runs compiled). While a sample contracts by at least ``fallback_rate``
    per evaluation the loops give it plain steps instead (see :class:`FixedPointSolver`).
    """

    fallback_rate: Optional[float] = 0.3

    def init(self, z: Tensor) -> State:
        b, d = z.shape
        m = int(self.config.memory)
        sd = _solve_dtype(z.dtype)
        return (z.new_zeros(b, m, d), z.new_zeros(b, m, d, dtype=sd), z.new_zeros(b, m, m, dtype=sd),
                torch.zeros(b, dtype=torch.int64, device=z.device))

    def step(self, state: State, z: Tensor, fz: Tensor) -> Tuple[Tensor, State]:
        # the small system and its products stay in the solve dtype under autocast too
        with torch.autocast(z.device.type, enabled=False):
            return self._step(state, z, fz)

    def first_step(self, state: State, z: Tensor, fz: Tensor) -> Tuple[Tensor, State]:
        """From a fresh history: one valid slot, so ``alpha = [1, 0, ...]`` exactly and the step is
        ``f(z)`` (damped: ``f(z) - (1 - d) G_0``, what :meth:`step` computes): only slot 0 is written."""
        F, G, H, k = state
        b, m, d = F.shape
        g = (fz - z).to(G.dtype)
        first = (torch.arange(m, device=z.device) == 0).view(1, m, 1)
        F = torch.where(first, fz.unsqueeze(1), F)
        G = torch.where(first, g.unsqueeze(1), G)
        H = torch.where(first & first.transpose(1, 2), (g * g).sum(1).view(b, 1, 1), H)
        dmp = float(self.config.damping)
        x = fz if dmp == 1.0 else (fz.to(G.dtype) - (1.0 - dmp) * g).to(z.dtype)
        return x, (F, G, H, k + 1)

    def _step(self, state: State, z: Tensor, fz: Tensor) -> Tuple[Tensor, State]:
        F, G, H, k = state
        b, m, d = F.shape
        sd = G.dtype
        g = (fz - z).to(sd)
        slot = (k % m).view(b, 1, 1)
        # Eager without autograd: write the slot in place. Otherwise (autograd, traced) functional,
        # as a pointwise select on a one-hot slot mask, which a compiler fuses with the loop's own
        # per-sample selects into one pass over the history (a scatter would copy it separately).
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and get_proxy_mode() is None:
            slot = (k % m).view(b, 1, 1)
            F.scatter_(1, slot.expand(b, 1, d), fz.unsqueeze(1))
            G.scatter_(1, slot.expand(b, 1, d), g.unsqueeze(1))
            h = torch.bmm(G, g.unsqueeze(2))  # [b, m, 1]: the new row and column of H
            H.scatter_(2, slot.expand(b, m, 1), h)
            H.scatter_(1, slot.expand(b, 1, m), h.transpose(1, 2))
        else:
            onehot = torch.arange(m, device=z.device) == (k % m).unsqueeze(1)  # [b, m]
            F = torch.where(onehot.unsqueeze(2), fz.unsqueeze(1), F)
            G = torch.where(onehot.unsqueeze(2), g.unsqueeze(1), G)
            h = torch.bmm(G, g.unsqueeze(2))
            row, col = onehot.unsqueeze(2), onehot.unsqueeze(1)
            H = torch.where(row, h.transpose(1, 2), torch.where(col, h, H))
        n_valid = (k + 1).clamp(max=m)
        valid = (torch.arange(m, device=z.device) < n_valid.unsqueeze(1)).to(sd)  # [b, m]
        diag = torch.diagonal(H, dim1=1, dim2=2)
        reg = float(self.config.regularization) * diag.sum(1, keepdim=True) / n_valid.unsqueeze(1) + torch.finfo(sd).tiny * 1e6
        # valid block: H + reg I; unused slots (zero rows) get 1 on the diagonal and a zero right-hand side
        A = H + torch.diag_embed(valid * reg + (1.0 - valid))
        # alpha = A^-1 1 / (1^T A^-1 1): the constrained least squares through its normal equations
        if torch.compiler.is_compiling():
            beta = spd_solve_unrolled(A, valid)  # no LAPACK inside a compiled while_loop body
        else:
            beta = _solve(A, valid.unsqueeze(2)).squeeze(2)
        alpha = (beta / beta.sum(1, keepdim=True)).unsqueeze(1)  # [b, 1, m]
        mix = torch.bmm(alpha, F.to(sd)).squeeze(1)
        dmp = float(self.config.damping)
        if dmp != 1.0:  # sum alpha_i x_i = sum alpha_i f(x_i) - sum alpha_i G_i
            mix = mix - (1.0 - dmp) * torch.bmm(alpha, G).squeeze(1)
        return mix.to(z.dtype), (F, G, H, k + 1)


Factory = Callable[[SolverConfig], FixedPointSolver]
_REGISTRY: Dict[str, Factory] = {}


def register_solver(name: str, cls_or_factory: Factory, *, overwrite: bool = False) -> Factory:
    """Register a solver class or ``factory(config) -> FixedPointSolver`` under ``name``.

    Raises:
        ConfigError: the name is taken (pass ``overwrite=True`` to replace it) or not callable.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_solver: name={name!r} is invalid: expected a non-empty string")
    if not callable(cls_or_factory):
        raise ConfigError(f"register_solver({name!r}): {cls_or_factory!r} is not a class or factory")
    if name in _REGISTRY and not overwrite:
        raise ConfigError(
            f"register_solver: a solver named {name!r} already exists; pass overwrite=True to replace it")
    _REGISTRY[name] = cls_or_factory
    return cls_or_factory


def available_solvers() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_solver(name: str) -> Factory:
    """The factory registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown solver {name!r}: expected one of {available_solvers()} "
            "or a name registered with fxwormhole.register_solver") from None


def make_solver(config: Union[str, SolverConfig]) -> FixedPointSolver:
    """Instantiate the solver a :class:`SolverConfig` (or a bare name) asks for."""
    cfg = SolverConfig(name=config) if isinstance(config, str) else config
    solver = get_solver(cfg.name)(cfg)
    if not (hasattr(solver, "init") and hasattr(solver, "step")):
        raise ConfigError(f"solver {cfg.name!r} built {solver!r}, which lacks init(z)/step(state, z, fz)")
    return solver


register_solver("picard", Picard)
register_solver("damped", Damped)
register_solver("anderson", Anderson)
