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

from typing import Callable, Dict, Tuple, Union

import torch
from torch import Tensor

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
    """

    def __init__(self, config: SolverConfig | None = None) -> None:
        self.config = config if config is not None else SolverConfig()

    def init(self, z: Tensor) -> State:
        return ()

    def step(self, state: State, z: Tensor, fz: Tensor) -> Tuple[Tensor, State]:
        return fz, state


class Picard(FixedPointSolver):
    """Plain iteration ``z <- f(z)``."""


class Damped(FixedPointSolver):
    """Relaxed iteration ``z <- (1 - d) z + d f(z)`` with ``d = config.damping``."""

    def step(self, state: State, z: Tensor, fz: Tensor) -> Tuple[Tensor, State]:
        d = float(self.config.damping)
        return torch.lerp(z, fz, d) if d != 1.0 else fz, state


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    # The least-squares system is tiny but badly conditioned: never solve it in half precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    ``z_next = d * sum_i alpha_i f(x_i) + (1 - d) * sum_i alpha_i x_i``. Unused slots are masked
    out of the system, so shapes never change (the same code runs inside ``torch.while_loop``).
    """

    def init(self, z: Tensor) -> State:
        b, d = z.shape
        m = int(self.config.memory)
        hist = z.new_zeros(b, m, d)
        # slot indices live in the state (batch dim 0): factory tensors created inside a
        # torch.while_loop body become graph constants that Inductor rejects
        slots = torch.arange(m, device=z.device).expand(b, m).clone()
        return hist, hist.clone(), torch.zeros(b, dtype=torch.int64, device=z.device), slots

    def step(self, state: State, z: Tensor, fz: Tensor) -> Tuple[Tensor, State]:
        X, F, k, slots = state
        m = X.shape[1]
        write = (slots == (k % m).unsqueeze(1)).unsqueeze(2)  # [b, m, 1]
        X = torch.where(write, z.unsqueeze(1), X)
        F = torch.where(write, fz.unsqueeze(1), F)
        valid = slots < (k + 1).clamp(max=m).unsqueeze(1)  # [b, m]

        sd = _solve_dtype(z.dtype)
        G = (F - X).to(sd)
        H = G @ G.transpose(1, 2)  # [b, m, m]
        vf = valid.to(sd)
        pair = vf.unsqueeze(2) * vf.unsqueeze(1)
        diag = torch.diagonal(H, dim1=1, dim2=2)
        scale = (diag * vf).sum(1) / vf.sum(1)  # mean ||G_i||^2 over valid slots
        reg = float(self.config.regularization) * scale + torch.finfo(sd).tiny * 1e6
        eye = (slots.unsqueeze(2) == slots.unsqueeze(1)).to(sd)
        # valid block: H + reg I ; invalid slots: identity row/col so their alpha is exactly 0
        Hm = H * pair + eye * (reg.view(-1, 1, 1) * pair + (1.0 - pair))
        if torch.compiler.is_compiling():
            # alpha = Hm^-1 1 / (1^T Hm^-1 1) by an unrolled Cholesky: linalg.solve inside a
            # while_loop body does not lower in Inductor 2.13 ("Unexpected fake buffer").
            beta = spd_solve_unrolled(Hm, vf)
            alpha = (beta / beta.sum(1, keepdim=True)).unsqueeze(2)
        else:
            # bordered system [[0, 1^T], [1, H]] [mu; alpha] = [1; 0] (LU with pivoting)
            corner = torch.zeros_like(vf[:, :1]).unsqueeze(2)
            A = torch.cat([torch.cat([corner, vf.unsqueeze(1)], 2), torch.cat([vf.unsqueeze(2), Hm], 2)], 1)
            rhs = torch.cat([torch.ones_like(corner), torch.zeros_like(vf).unsqueeze(2)], 1)
            alpha = torch.linalg.solve(A, rhs)[:, 1:]  # [b, m, 1]
        d = float(self.config.damping)
        mix_f = (alpha.transpose(1, 2) @ F.to(sd)).squeeze(1)
        if d != 1.0:
            mix_x = (alpha.transpose(1, 2) @ X.to(sd)).squeeze(1)
            mix_f = d * mix_f + (1.0 - d) * mix_x
        return mix_f.to(z.dtype), (X, F, k + 1, slots)


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
