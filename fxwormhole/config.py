"""Frozen, validated configuration objects.

Each dataclass checks its fields at construction and raises :class:`ConfigError` naming the bad
field and the values it accepts, so a mistake surfaces where it was made, not deep in a pass.
That is everything a config can check alone: types, ranges, the ``wormholes`` grammar, and solver
names against the solver registry of that moment. What needs the model (layer names, shapes,
dtypes) is checked by ``transform``, which also checks solver names again (the rule, once:
docs/api.md, "When a configuration is checked").
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence, Tuple, Union

from .errors import ConfigError
from .policy import parse_policy

__all__ = ["SolverConfig", "GradConfig", "WormholeConfig", "SALConfig", "coerce_solver", "coerce_grad",
           "registered_solvers", "require_registered_solvers"]

ON_FAIL = ("warn", "raise", "ignore")
GRAD_MODES = ("implicit", "phantom", "jfb", "unrolled")
GATE_KINDS = ("scalar", "channel", "input")
HALTING = ("sample", "batch")
#: the solvers fxwormhole.runtime.solvers registers when it is imported
BUILTIN_SOLVERS = ("anderson", "damped", "picard")
_REGISTRY_MODULE = "fxwormhole.runtime.solvers"


def registered_solvers() -> tuple[str, ...]:
    """The solver names a config may use now: the built-in ones and those ``register_solver`` added.

    The registry module imports this one (its solvers take a :class:`SolverConfig`), so it is looked
    up, not imported: importing it here would close an import cycle. Until it is imported nothing
    can have been registered, and the built-in names are the whole registry.
    """
    registry = sys.modules.get(_REGISTRY_MODULE)
    listed = getattr(registry, "available_solvers", None)
    return tuple(sorted(set(BUILTIN_SOLVERS) | set(listed() if listed is not None else ())))


def _check(cond: bool, cls: str, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{name}={value!r} is invalid: expected {allowed}")


def _positive_int(cls: str, name: str, value: Any) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, cls, name, value, "an int >= 1")


def _real(value: Any) -> bool:
    """A finite int or float, not a bool (``True`` is an int to Python, never a damping to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_float(cls: str, name: str, value: Any) -> None:
    _check(_real(value) and value > 0, cls, name, value, "a finite float > 0")


def _flag(cls: str, name: str, value: Any) -> None:
    _check(isinstance(value, bool), cls, name, value, "True or False")


def _solver_name(cls: str, name: str, value: Any) -> None:
    known = registered_solvers()
    if not (isinstance(value, str) and value in known):
        raise ConfigError(f"{cls}.{name}={value!r} is invalid: unknown solver; expected one of {known} or a name "
                          f"registered with fxwormhole.register_solver (register it first)")


@dataclass(frozen=True)
class SolverConfig:
    """How a fixed point is found.

    Args:
        name: solver in the registry (``picard``, ``damped``, ``anderson`` or a registered one).
        tol: per-sample relative residual ``||z_{k+1}-z_k|| / (||z_{k+1}|| + eps)`` to stop at.
        max_iter: iteration cap.
        damping: relaxation factor of ``damped`` (and of Anderson's mixing), in (0, 1].
        memory: Anderson history length m.
        regularization: Anderson's Tikhonov term on the small least-squares system.
        check_every: iterations between residual checks (each check may cost a host sync on GPU).
        halting: ``"sample"`` stops each sample when it converges (shrinking the active set in
            eager mode); ``"batch"`` iterates the whole batch until every sample converged (needed
            when the body couples samples, e.g. BatchNorm in training mode).
        divergence_factor: a residual this many times larger than the smallest one seen marks the
            sample ``diverged``.
    """

    name: str = "anderson"
    tol: float = 1e-5
    max_iter: int = 50
    damping: float = 1.0
    memory: int = 5
    regularization: float = 1e-4
    check_every: int = 1
    halting: str = "sample"
    divergence_factor: float = 1e4

    def __post_init__(self) -> None:
        c = type(self).__name__
        _solver_name(c, "name", self.name)
        _positive_float(c, "tol", self.tol)
        _positive_int(c, "max_iter", self.max_iter)
        _check(_real(self.damping) and 0 < self.damping <= 1, c, "damping", self.damping, "a float in (0, 1]")
        _positive_int(c, "memory", self.memory)
        _check(_real(self.regularization) and self.regularization >= 0, c, "regularization", self.regularization,
               "a finite float >= 0")
        _positive_int(c, "check_every", self.check_every)
        _check(self.halting in HALTING, c, "halting", self.halting, f"one of {HALTING}")
        _positive_float(c, "divergence_factor", self.divergence_factor)


@dataclass(frozen=True)
class GradConfig:
    """How the gradient of a fixed point is computed.

    Args:
        mode: ``implicit`` (adjoint fixed point, the default), ``phantom`` (k damped steps, as
            TorchDEQ's ``grad=k``), ``jfb`` (one step) or ``unrolled`` (back-propagation through
            the forward iterations; a reference, memory grows with iterations).
        solver: solver of the adjoint fixed point (implicit mode).
        tol, max_iter: stopping rule of the adjoint solve (implicit mode).
        k, tau: number of steps and damping of the phantom gradient.
    """

    mode: str = "implicit"
    solver: str = "picard"
    tol: float = 1e-6
    max_iter: int = 50
    k: int = 5
    tau: float = 0.6

    def __post_init__(self) -> None:
        c = type(self).__name__
        _check(self.mode in GRAD_MODES, c, "mode", self.mode, f"one of {GRAD_MODES}")
        _solver_name(c, "solver", self.solver)
        _positive_float(c, "tol", self.tol)
        _positive_int(c, "max_iter", self.max_iter)
        _positive_int(c, "k", self.k)
        _check(_real(self.tau) and 0 < self.tau <= 1, c, "tau", self.tau, "a float in (0, 1]")


def _coerce(cls: type, key: str, value: Any, what: str, overrides: dict) -> Any:
    """A ``cls`` from None, an instance or a name (stored in field ``key``), with overrides applied."""
    if value is None:
        base = cls()
    elif isinstance(value, cls):
        base = value
    elif isinstance(value, str):
        base = cls(**{key: value})
    else:
        raise ConfigError(f"{what}={value!r} is invalid: expected a name or a {cls.__name__}")
    known = {f.name for f in fields(cls)}
    kw = {k: v for k, v in overrides.items() if v is not None and k in known}
    return replace(base, **kw) if kw else base


def coerce_solver(value: Union[str, SolverConfig, None], **overrides: Any) -> SolverConfig:
    """Accept a solver name or a :class:`SolverConfig`; apply keyword overrides that are not None."""
    return _coerce(SolverConfig, "name", value, "solver", overrides)


def coerce_grad(value: Union[str, GradConfig, None], **overrides: Any) -> GradConfig:
    """Accept a gradient mode name or a :class:`GradConfig`; apply overrides that are not None."""
    return _coerce(GradConfig, "mode", value, "grad", overrides)


def require_registered_solvers(config: "WormholeConfig") -> None:
    """Check the solver names of ``config`` against the registry as it is now.

    Construction checked them against the registry of its moment; this is the second check, where
    a config is used (``transform``): a config unpickled (unpickling runs no checks) in a process
    that has not registered its solver yet would otherwise fail at the first forward or backward.
    """
    _solver_name("SolverConfig", "name", config.solver.name)
    _solver_name("GradConfig", "solver", config.grad.solver)


Span = Tuple[str, str]


@dataclass(frozen=True)
class WormholeConfig:
    """Where wormholes go and how their fixed points are solved.

    Args:
        wormholes: ``"auto"`` (deepest hidden layer of the main path back to the first layer),
            ``"every:K"`` (a wormhole from every K-th layer of the main path back K layers), or an
            explicit list of ``(src, dst)`` pairs: ``src`` names the layer whose output feeds back,
            ``dst`` the layer whose input is modulated (module paths as in ``named_modules()``, or
            fx node names).
        gate: ``scalar`` (one learned gate per wormhole), ``channel`` (one per destination channel)
            or ``input`` (``sigmoid(W_g h_src + b_g)``, per sample and channel).
        gate_init: initial gate bias; -6 makes ``sigmoid`` about 0.0025 (closed).
        proj_init: ``"zero"`` starts the projection at zero so the transformed model equals the
            original exactly at initialisation; ``"normal"`` draws small weights (std ``proj_std``).
        proj_std: standard deviation of the projection's initial weights when ``proj_init="normal"``.
        solver, tol, max_iter: forward solve (a name or a :class:`SolverConfig`; tol/max_iter
            override the SolverConfig's when given).
        grad: gradient mode or :class:`GradConfig`.
        on_fail: ``warn`` | ``raise`` | ``ignore`` when a solve does not converge.
        gate_cap: optional upper bound on every gate value (a divergence guard); None for none.
        spectral_norm: wrap projections in spectral normalisation (a contraction guard).
        contraction: weight of the contraction regulariser ``||J_T(z*) v||^2`` that every fixed
            point adds to the backward in training mode (no change to the loss; 0 = off). See
            :meth:`active` for the recommended configuration of feedback active from the start.
        compute_cost: weight of the per-sample compute cost ``||T(z0)|| / ||x_dst||`` (the feedback
            injected after the first evaluation), added to the backward like ``contraction``: it
            teaches the gates to stay shut on inputs the feedback does not help (0 = off).
    """

    wormholes: Union[str, Sequence[Span]] = "auto"
    gate: str = "scalar"
    gate_init: float = -6.0
    proj_init: str = "zero"
    proj_std: float = 1e-2
    solver: Union[str, SolverConfig] = "anderson"
    tol: float | None = None
    max_iter: int | None = None
    grad: Union[str, GradConfig] = "implicit"
    on_fail: str = "warn"
    gate_cap: float | None = None
    spectral_norm: bool = False
    contraction: float = 0.0
    compute_cost: float = 0.0

    @classmethod
    def active(cls, **changes: Any) -> "WormholeConfig":
        """The recommended configuration for feedback that is active from the start: input gates
        at ``sigmoid(-1)`` capped at 0.5, normal projections of std 0.1 with their spectral norm
        capped at 1, Picard to 1e-3 with an adjoint to 1e-4 (up to 100 steps), and the contraction
        regulariser at weight 1. Together they keep every cycle contractive while it trains
        (measured in ``docs/adaptive_depth.md``). ``changes`` override any field."""
        base = dict(gate="input", gate_init=-1.0, proj_init="normal", proj_std=0.1, gate_cap=0.5, spectral_norm=True,
                    solver="picard", tol=1e-3, max_iter=30, grad=GradConfig(tol=1e-4, max_iter=100), contraction=1.0)
        return cls(**{**base, **changes})

    def __post_init__(self) -> None:
        c = type(self).__name__
        policy = parse_policy(self.wormholes, c)  # the grammar lives in one place: fxwormhole.policy
        if not policy.automatic:
            object.__setattr__(self, "wormholes", policy.pairs)
        _check(self.gate in GATE_KINDS, c, "gate", self.gate, f"one of {GATE_KINDS}")
        _check(_real(self.gate_init), c, "gate_init", self.gate_init, "a finite float")
        _check(self.proj_init in ("zero", "normal"), c, "proj_init", self.proj_init, "'zero' or 'normal'")
        _positive_float(c, "proj_std", self.proj_std)
        if self.tol is not None:
            _positive_float(c, "tol", self.tol)
        if self.max_iter is not None:
            _positive_int(c, "max_iter", self.max_iter)
        _check(self.on_fail in ON_FAIL, c, "on_fail", self.on_fail, f"one of {ON_FAIL}")
        if self.gate_cap is not None:
            _check(_real(self.gate_cap) and 0 < self.gate_cap <= 1, c, "gate_cap", self.gate_cap, "None or a float in (0, 1]")
        _flag(c, "spectral_norm", self.spectral_norm)
        for name in ("contraction", "compute_cost"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
            _check(ok, c, name, value, "a finite float >= 0")
        # Resolve names now so that a bad solver/grad name fails at construction.
        object.__setattr__(self, "solver", coerce_solver(self.solver, tol=self.tol, max_iter=self.max_iter))
        object.__setattr__(self, "grad", coerce_grad(self.grad))


@dataclass(frozen=True)
class SALConfig:
    """Sensitivity probes and sensitivity adjustment learning (SAL).

    Args:
        eta: SAL step size (added to the task gradient at every optimizer step).
        beta: decay of the per-neuron moving average ``s_bar``.
        target: sensitivity the rule aims for.
        two_sided: also lower sensitivity above the target (default: only raise it below).
        log_form: use the gradient of ``log s`` instead of ``s`` (scale free, more robust).
        recurrent_only: for RNN cells, count only the recurrent weights in ``||w||``.
        enabled: probes only (measure sensitivity) when False.
        separate_step: keep SAL's update out of ``.grad``: the probes collect it during the forward
            pass and ``fxwormhole.runtime.sensitivity.sal_step(model)`` (or the optimizer hook of
            ``attach_sal_step``) applies it. Gradient clipping, Adam's normalisation, momentum and
            weight decay then act on the task gradient alone, and ``eta`` is SAL's absolute step.
    """

    eta: float = 1e-3
    beta: float = 0.99
    target: float = 1.0
    two_sided: bool = False
    log_form: bool = False
    recurrent_only: bool = False
    enabled: bool = True
    separate_step: bool = False

    def __post_init__(self) -> None:
        c = type(self).__name__
        _check(_real(self.eta) and self.eta >= 0, c, "eta", self.eta, "a finite float >= 0")
        _check(_real(self.beta) and 0 <= self.beta < 1, c, "beta", self.beta, "a float in [0, 1)")
        _positive_float(c, "target", self.target)
        for name in ("two_sided", "log_form", "recurrent_only", "enabled"):
            _flag(c, name, getattr(self, name))
