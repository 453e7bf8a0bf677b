"""Activations: the one table of their forms in a graph, and their derivatives for sensitivity probes and SAL.

:data:`ACTIVATIONS` lists every elementwise activation the toolkit recognises and the forms it takes
in a captured graph (module, function, method, ATen op); :func:`classify_activation` and
:func:`activation_params` read it (``fxwormhole.analysis`` uses them for the layer table), and the
translation of user callables to sympy reads it too.

A probe needs ``f'(U)`` (sensitivity ``s = f'(U) ||w||``), ``f''(U)`` (the de-saturation term of the
SAL update) and ``f''(U)/f'(U)`` (the same term in the log form). For every activation the
sensitivity pass meets, :func:`derivatives` differentiates a sympy expression of ``f`` ONCE, at
transform time, and prints each derivative as straight-line torch code (``torch.where`` for
piecewise functions), so that the probe's forward stays plain tensor code that torch.compile traces.

Built-in: ``tanh``, ``sigmoid``, ``shifted_sigmoid`` (``sigmoid(u) - 1/2``, range -0.5..0.5),
``softsign``, ``gelu`` (erf form), ``gelu_tanh``, ``silu``, ``elu``, ``relu``, ``leaky_relu``,
``hardtanh``, ``softplus`` and ``identity`` (an output layer without activation: ``f' = 1``).
Add your own with :func:`register_activation`, or hand :func:`derivatives_of_callable` an
elementwise Python function written with torch ops: it is traced with torch.fx and translated to
sympy op by op. A function sympy cannot express falls back to nested ``torch.func.grad`` (source
``"autograd"``, reported by :func:`fxwormhole.instrument.sensitivity_report`).

Where ``f`` has kinks (relu, leaky relu, elu, hardtanh), ``f''`` contains Dirac deltas; they are
dropped (the derivative holds almost everywhere).
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional, Tuple

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = [
    "ActivationForm",
    "ACTIVATIONS",
    "classify_activation",
    "activation_params",
    "Derivatives",
    "Sigmoid",
    "Softplus",
    "register_activation",
    "registered_activations",
    "derivatives",
    "derivatives_of_callable",
    "sympy_of_callable",
    "registered_form",
    "NotExpressible",
]

U = sympy.Symbol("u", real=True)
Fn = Callable[[Tensor], Tensor]


class Sigmoid(sympy.Function):
    """Logistic function as one sympy node: derivatives stay ``s(1-s)`` (no overflowing ``exp``)."""

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        s = Sigmoid(self.args[0])
        return s * (1 - s)


class Softplus(sympy.Function):
    """``log(1 + exp(u))`` as one sympy node whose derivative is :class:`Sigmoid` (stable)."""

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return Sigmoid(self.args[0])


class NotExpressible(Exception):
    """Raised when a torch function has no sympy translation (the caller falls back to autograd)."""


@dataclass(frozen=True)
class Derivatives:
    """An activation and its first two derivatives as torch callables.

    Attributes:
        name: registry name (or the callable's name for user functions).
        f, d1, d2: ``f(u)``, ``f'(u)``, ``f''(u)`` elementwise.
        ratio: ``f''(u)/f'(u)``, 0 where ``f'(u) = 0`` (used by the log form of SAL).
        source: ``"sympy"`` (closed form printed to torch code) or ``"autograd"`` (fallback).
        exprs: sympy expressions ``(f, f', f'', f''/f')`` for the sympy source, else None.
        d1_d2: ``u -> (f'(u), f''(u))`` in one pass over shared subexpressions.
    """

    name: str
    f: Fn
    d1: Fn
    d2: Fn
    ratio: Fn
    source: str
    exprs: Optional[Tuple[sympy.Expr, ...]] = field(default=None, compare=False)
    d1_d2: Optional[Callable[[Tensor], Tuple[Tensor, Tensor]]] = field(default=None, compare=False)
    params: Optional[Tuple[Tuple[str, Any], ...]] = field(default=None, compare=False)  # set for registry entries

    def __reduce__(self):
        # The torch callables are generated code (not picklable); a registry entry is re-derived
        # from its name and parameters, so probes holding it survive torch.save / deepcopy.
        if self.params is not None:
            return (_rebuild_registered, (self.name, self.params))
        return super().__reduce__()

    def first_and_second(self, u: Tensor) -> Tuple[Tensor, Tensor]:
        """``(f'(u), f''(u))``, sharing work where the closed forms allow."""
        return self.d1_d2(u) if self.d1_d2 is not None else (self.d1(u), self.d2(u))


# ------------------------------------------------------------------ the one table of activations
@dataclass(frozen=True)
class ActivationForm:
    """One elementwise activation and every form it takes in a captured graph.

    ``params``: ``(name, default)`` in the functional/ATen positional order after the input.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    modules: tuple[type, ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[str, ...] = ()  # ATen op names without overload and trailing ``_``


#: The one table of activations: what analysis classifies and what the sensitivity maths
#: (fxwormhole.passes.activations) translates. ReLU6 is reported as hardtanh(0, 6).
ACTIVATIONS: tuple[ActivationForm, ...] = (
    ActivationForm("tanh", (), (nn.Tanh,), (torch.tanh, F.tanh, torch.tanh_), ("tanh", "tanh_"), ("tanh",)),
    ActivationForm("sigmoid", (), (nn.Sigmoid,), (torch.sigmoid, F.sigmoid, torch.sigmoid_), ("sigmoid", "sigmoid_"),
                   ("sigmoid",)),
    ActivationForm("relu", (), (nn.ReLU,), (torch.relu, F.relu, torch.relu_), ("relu", "relu_"), ("relu",)),
    ActivationForm("relu6", (), (nn.ReLU6,), (F.relu6,), (), ("relu6",)),
    ActivationForm("gelu", (("approximate", "none"),), (nn.GELU,), (F.gelu,), (), ("gelu",)),
    ActivationForm("silu", (), (nn.SiLU,), (F.silu,), (), ("silu",)),
    ActivationForm("elu", (("alpha", 1.0),), (nn.ELU,), (F.elu,), (), ("elu",)),
    ActivationForm("leaky_relu", (("negative_slope", 0.01),), (nn.LeakyReLU,), (F.leaky_relu,), (), ("leaky_relu",)),
    ActivationForm("softsign", (), (nn.Softsign,), (F.softsign,)),
    ActivationForm("hardtanh", (("min_val", -1.0), ("max_val", 1.0)), (nn.Hardtanh,), (F.hardtanh,), (), ("hardtanh",)),
    ActivationForm("softplus", (("beta", 1.0), ("threshold", 20.0)), (nn.Softplus,), (F.softplus,), (), ("softplus",)),
    ActivationForm("mish", (), (nn.Mish,), (F.mish,), (), ("mish",)),
    ActivationForm("hardsigmoid", (), (nn.Hardsigmoid,), (F.hardsigmoid,), (), ("hardsigmoid",)),
    ActivationForm("hardswish", (), (nn.Hardswish,), (F.hardswish,), (), ("hardswish",)),
    ActivationForm("selu", (), (nn.SELU,), (F.selu, torch.selu), (), ("selu",)),
    ActivationForm("celu", (("alpha", 1.0),), (nn.CELU,), (F.celu, torch.celu), (), ("celu",)),
    ActivationForm("logsigmoid", (), (nn.LogSigmoid,), (F.logsigmoid,), (), ("log_sigmoid",)),
    ActivationForm("tanhshrink", (), (nn.Tanhshrink,), (F.tanhshrink,)),
)
_FORMS = {form.name: form for form in ACTIVATIONS}
_MODULE_ACTS = {cls: form.name for form in ACTIVATIONS for cls in form.modules}
_FUNCTION_ACTS = {fn: form.name for form in ACTIVATIONS for fn in form.functions}
_METHOD_ACTS = {m: form.name for form in ACTIVATIONS for m in form.methods}
_ATEN_ACTS = {op: form.name for form in ACTIVATIONS for op in form.aten}


def classify_activation(gm: fx.GraphModule | None, node: fx.Node, *, mods: dict | None = None) -> str | None:
    """The canonical elementwise activation ``node`` computes, or None.

    Recognises ``call_module`` (nn.Tanh, nn.LeakyReLU, ...), ``call_function`` (torch.tanh,
    F.relu, F.leaky_relu, aten.relu.default, ...) and ``call_method`` ("tanh", "relu_", ...).
    ReLU6 is reported as ``"hardtanh"`` with ``min_val=0, max_val=6`` (see :func:`activation_params`)
    so both front ends agree.
    """
    name = _raw_activation(gm, node, mods)
    return "hardtanh" if name == "relu6" else name


def _raw_activation(gm, node: fx.Node, mods) -> str | None:
    if node.op == "call_module":
        mods = mods if mods is not None else (dict(gm.named_modules()) if gm is not None else {})
        mod = mods.get(node.target)
        return _MODULE_ACTS.get(type(mod)) or next((v for k, v in _MODULE_ACTS.items() if isinstance(mod, k)), None)
    if node.op == "call_method":
        return _METHOD_ACTS.get(node.target)
    if node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        base = node.target._schema.name.split("::")[-1].rstrip("_")
        return _ATEN_ACTS.get(base)
    try:
        return _FUNCTION_ACTS.get(node.target)
    except TypeError:  # unhashable target
        return None


def activation_params(gm: fx.GraphModule | None, node: fx.Node, *, mods: dict | None = None) -> dict[str, Any]:
    """Parameters of the activation at ``node`` (e.g. ``{"negative_slope": 0.2}``), defaults filled in."""
    raw = _raw_activation(gm, node, mods)
    if raw is None:
        return {}
    if raw == "relu6":
        return {"min_val": 0.0, "max_val": 6.0}
    form = _FORMS[raw]
    names = tuple(name for name, _ in form.params)
    params = dict(form.params)
    if node.op == "call_module":
        mods = mods if mods is not None else dict(gm.named_modules())
        mod = mods[node.target]
        params.update({k: getattr(mod, k) for k in names if hasattr(mod, k)})
        return params
    for i, k in enumerate(names):
        if len(node.args) > i + 1:
            params[k] = node.args[i + 1]
        elif k in node.kwargs:
            params[k] = node.kwargs[k]
    return params


# ------------------------------------------------------------------ registry of sympy definitions
ExprFn = Callable[..., sympy.Expr]
_REGISTRY: Dict[str, ExprFn] = {}


def register_activation(name: str, expr_fn: ExprFn, *, overwrite: bool = False) -> None:
    """Register ``expr_fn(u, **params) -> sympy.Expr`` under ``name``.

    ``u`` is a real sympy Symbol; use :class:`Sigmoid` for the logistic function (numerically
    stable derivatives) and ``sympy.Piecewise`` for kinks. Example::

        register_activation("swish2", lambda u, beta=2.0: u * Sigmoid(beta * u))
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_activation: name={name!r} is invalid: expected a non-empty string")
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"register_activation: {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(expr_fn):
        raise ConfigError(f"register_activation({name!r}): expr_fn must be callable (u, **params) -> sympy.Expr")
    _REGISTRY[name] = expr_fn
    derivatives.cache_clear()


def registered_activations() -> list[str]:
    """Names :func:`derivatives` knows."""
    return sorted(_REGISTRY)


def _relu(u):
    return sympy.Piecewise((u, u > 0), (0, True))


def _leaky_relu(u, negative_slope=0.01):
    return sympy.Piecewise((u, u > 0), (sympy.Float(negative_slope) * u, True))


def _elu(u, alpha=1.0):
    return sympy.Piecewise((u, u > 0), (sympy.Float(alpha) * (sympy.exp(u) - 1), True))


def _hardtanh(u, min_val=-1.0, max_val=1.0):
    lo, hi = sympy.Float(min_val), sympy.Float(max_val)
    return sympy.Piecewise((lo, u < lo), (hi, u > hi), (u, True))


def _gelu_tanh(u):
    return u / 2 * (1 + sympy.tanh(sympy.sqrt(2 / sympy.pi) * (u + sympy.Rational(44715, 1000000) * u**3)))


for _name, _fn in {
    "identity": lambda u: u,
    "tanh": sympy.tanh,
    "sigmoid": Sigmoid,
    "shifted_sigmoid": lambda u: Sigmoid(u) - sympy.Rational(1, 2),
    "softsign": lambda u: u / (1 + sympy.Abs(u)),
    "gelu": lambda u: u / 2 * (1 + sympy.erf(u / sympy.sqrt(2))),
    "gelu_tanh": _gelu_tanh,
    "silu": lambda u: u * Sigmoid(u),
    "softplus": lambda u, beta=1.0, threshold=20.0: Softplus(sympy.Float(beta) * u) / sympy.Float(beta),
    "elu": _elu,
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "hardtanh": _hardtanh,
}.items():
    _REGISTRY[_name] = _fn


# ------------------------------------------------------------------ sympy -> torch source printer
_FUNCS: Dict[Any, str] = {
    sympy.tanh: "torch.tanh",
    sympy.exp: "torch.exp",
    sympy.log: "torch.log",
    sympy.erf: "torch.special.erf",
    sympy.erfc: "torch.special.erfc",
    sympy.sin: "torch.sin",
    sympy.cos: "torch.cos",
    sympy.sinh: "torch.sinh",
    sympy.cosh: "torch.cosh",
    sympy.atan: "torch.atan",
    sympy.sign: "torch.sign",
    sympy.Abs: "torch.abs",
    Sigmoid: "torch.sigmoid",
    Softplus: "torch.nn.functional.softplus",
}
_RELS = {sympy.StrictGreaterThan: ">", sympy.GreaterThan: ">=", sympy.StrictLessThan: "<", sympy.LessThan: "<=",
         sympy.Equality: "==", sympy.Unequality: "!="}


def _src(e: sympy.Expr) -> str:
    if not e.free_symbols:
        if e in (sympy.true, sympy.false):
            return repr(bool(e))
        return repr(float(e))
    if isinstance(e, sympy.Symbol):
        return "u" if e == U else e.name  # the input, or a common subexpression of _compile_many
    if isinstance(e, sympy.Add):
        # Terms with a negative coefficient print as subtractions: one tensor op each, not two.
        pos = [a for a in e.args if not a.could_extract_minus_sign()]
        neg = [-a for a in e.args if a.could_extract_minus_sign()]
        head = " + ".join(_src(a) for a in pos) if pos else f"-{_src(neg.pop(0))}"
        return "(" + head + "".join(f" - {_src(a)}" for a in neg) + ")"
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff != 1 and rest.free_symbols:  # the number rides on the last product: no separate negation
            return f"({_src(rest)} * {float(coeff)!r})"
        return "(" + " * ".join(_src(a) for a in e.args) + ")"
    if isinstance(e, sympy.Pow):
        base, ex = e.args
        if ex == sympy.Rational(1, 2):
            return f"torch.sqrt({_src(base)})"
        if ex == -1:
            return f"(1.0 / {_src(base)})"
        if ex.is_Integer:
            return f"({_src(base)} ** {int(ex)})"
        return f"torch.pow({_src(base)}, {_src(ex)})"
    if isinstance(e, sympy.Piecewise):
        out = None
        for value, cond in reversed(e.args):
            v = _src_tensor(value)
            out = v if (cond is sympy.true or out is None) else f"torch.where({_src(cond)}, {v}, {out})"
        return out
    if type(e) in _RELS:
        return f"({_src(e.args[0])} {_RELS[type(e)]} {_src(e.args[1])})"
    if isinstance(e, sympy.And):
        return "(" + " & ".join(_src(a) for a in e.args) + ")"
    if isinstance(e, sympy.Or):
        return "(" + " | ".join(_src(a) for a in e.args) + ")"
    fn = _FUNCS.get(type(e)) or _FUNCS.get(e.func)
    if fn is not None and len(e.args) == 1:
        return f"{fn}({_src(e.args[0])})"
    raise NotExpressible(f"no torch translation for sympy node {e.func} in {e}")


def _src_tensor(e: sympy.Expr) -> str:
    """Like :func:`_src`, but a constant becomes a tensor shaped like ``u`` (torch.where needs one)."""
    return f"torch.full_like(u, {float(e)!r})" if not e.free_symbols else _src(e)


def _compile(e: sympy.Expr, name: str) -> Fn:
    one = _compile_many((e,), name)
    fn = lambda u: one(u)[0]  # noqa: E731
    fn.__source__ = one.__source__  # type: ignore[attr-defined]
    return fn


def _compile_many(exprs: Tuple[sympy.Expr, ...], name: str) -> Callable[[Tensor], Tuple[Tensor, ...]]:
    """One function returning several expressions, sharing common subexpressions (sympy.cse):
    e.g. ``f'`` and ``f''`` of tanh evaluate ``tanh(u)`` and ``1 - tanh(u)**2`` once."""
    subs, reduced = sympy.cse([sympy.factor_terms(e) for e in exprs], symbols=sympy.numbered_symbols("_c"))
    lines = [f"    {sym.name} = {_src(val)}" for sym, val in subs]
    outs = "".join(_src_tensor(e) + ", " for e in reduced)
    code = f"def {name}(u):\n" + "\n".join(lines + [f"    return {outs}"]) + "\n"
    namespace: Dict[str, Any] = {"torch": torch}
    exec(compile(code, f"<fxwormhole.activations:{name}>", "exec"), namespace)  # noqa: S102 - our own printed code
    fn = namespace[name]
    fn.__source__ = code  # type: ignore[attr-defined]
    return fn


def _drop_dirac(e: sympy.Expr) -> sympy.Expr:
    return e.replace(lambda a: isinstance(a, sympy.DiracDelta), lambda a: sympy.Integer(0))


def _from_expr(name: str, f: sympy.Expr) -> Derivatives:
    d1 = _drop_dirac(sympy.piecewise_fold(sympy.diff(f, U)))
    d2 = _drop_dirac(sympy.piecewise_fold(sympy.diff(d1, U)))
    d1_fn, d2_fn = _compile(d1, "d1"), _compile(d2, "d2")
    quotient = sympy.piecewise_fold(d2 / d1)
    # simplify() is slow on large expressions; those rarely simplify to anything useful anyway.
    ratio = sympy.Integer(0) if d2 == 0 else (sympy.simplify(quotient) if quotient.count_ops() <= 30 else quotient)
    if ratio.free_symbols and ratio.count_ops() > d2.count_ops():
        # No closed form simpler than the quotient (gelu): divide numerically, which avoids the
        # overflowing exp(u**2/2) that sympy's simplified form contains.
        ratio, raw = d2 / d1, lambda u: d2_fn(u) / d1_fn(u)
    else:
        raw = _compile(ratio, "ratio")

    def ratio_fn(u: Tensor) -> Tensor:
        # f'' / f' is undefined where f' vanishes (dead relu, saturated units): use 0 there.
        g = d1_fn(u)
        return torch.where(g != 0, raw(torch.where(g != 0, u, torch.zeros_like(u))), torch.zeros_like(u))

    joint = _compile_many((d1, d2), "d1_d2") if d1.free_symbols and d2.free_symbols else None
    return Derivatives(name, _compile(f, "f"), d1_fn, d2_fn, ratio_fn if ratio.free_symbols else raw,
                       "sympy", (f, d1, d2, ratio), joint)


def _params_key(params: Dict[str, Any]) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


@functools.lru_cache(maxsize=None)
def _cached(name: str, key: Tuple[Tuple[str, Any], ...]) -> Derivatives:
    return replace(_from_expr(name, _REGISTRY[name](U, **dict(key))), params=key)


def _rebuild_registered(name: str, key: Tuple[Tuple[str, Any], ...]) -> Derivatives:
    return derivatives(name, **dict(key))


def derivatives(name: str, **params: Any) -> Derivatives:
    """Derivatives of the registered activation ``name`` with ``params`` (e.g. ``negative_slope``).

    Computed once per (name, params) and cached.

    Raises:
        ConfigError: ``name`` is not registered.
    """
    if name not in _REGISTRY:
        raise ConfigError(
            f"activation {name!r} has no registered derivative: expected one of {registered_activations()}; "
            "register it with fxwormhole.passes.activations.register_activation(name, expr_fn)")
    return _cached(name, _params_key(params))


derivatives.cache_clear = _cached.cache_clear  # type: ignore[attr-defined]


# ------------------------------------------------------------------ user callables -> sympy
def registered_form(name: str, params: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The registry entry for an activation as :func:`fxwormhole.analysis.classify_activation` names it
    (with :func:`~fxwormhole.analysis.activation_params`), or None when none is registered."""
    if name == "gelu" and params.get("approximate", "none") == "tanh":
        return "gelu_tanh", {}
    if name not in _REGISTRY:
        return None
    return name, {k: v for k, v in params.items() if k not in ("inplace", "approximate")}


# Elementary functions and arithmetic (activations are recognised by fxwormhole.analysis' table).
_CALLS: Dict[Any, Callable[..., sympy.Expr]] = {
    torch.exp: sympy.exp, torch.log: sympy.log, torch.sqrt: sympy.sqrt,
    torch.sin: sympy.sin, torch.cos: sympy.cos, torch.sinh: sympy.sinh, torch.cosh: sympy.cosh,
    torch.atan: sympy.atan, torch.abs: sympy.Abs, torch.sign: sympy.sign,
    torch.erf: sympy.erf, torch.special.erf: sympy.erf,
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.truediv: operator.truediv, operator.pow: operator.pow, operator.neg: operator.neg,
    torch.add: operator.add, torch.sub: operator.sub, torch.mul: operator.mul, torch.div: operator.truediv,
    torch.pow: operator.pow, torch.neg: operator.neg,
}
_METHODS: Dict[str, Callable[..., sympy.Expr]] = {
    "exp": sympy.exp, "log": sympy.log, "sqrt": sympy.sqrt, "abs": sympy.Abs, "sin": sympy.sin, "cos": sympy.cos,
    "neg": operator.neg, "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "pow": operator.pow,
}


def _sym_arg(a: Any, env: Dict[Any, sympy.Expr]) -> Any:
    if isinstance(a, torch.fx.Node):
        return env[a]
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return sympy.Float(a) if isinstance(a, float) else sympy.Integer(a)
    return a


def _activation_expr(gm: torch.fx.GraphModule, node: torch.fx.Node, env: Dict[Any, sympy.Expr]) -> Optional[sympy.Expr]:
    """The sympy form of an activation node (tanh, F.leaky_relu(x, 0.2), nn.GELU(), ...), else None."""
    name = classify_activation(gm, node)
    form = registered_form(name, activation_params(gm, node)) if name is not None else None
    if form is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    key, params = form
    return _REGISTRY[key](env[node.args[0]], **params)


def sympy_of_callable(fn: Callable[[Tensor], Tensor]) -> sympy.Expr:
    """Translate an elementwise one-argument torch function or activation module to sympy.

    The function is traced with ``torch.fx.symbolic_trace`` and each op is mapped to sympy.

    Raises:
        NotExpressible: an op has no sympy counterpart (caller falls back to autograd).
    """
    try:
        gm = torch.fx.symbolic_trace(fn)
    except Exception as exc:  # noqa: BLE001 - anything untraceable is "not expressible"
        raise NotExpressible(f"cannot trace {fn!r}: {exc}") from exc
    env: Dict[Any, sympy.Expr] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if env:
                raise NotExpressible("activation takes more than one tensor argument")
            env[node] = U
        elif node.op == "output":
            out = env.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
            if out is None:
                raise NotExpressible("activation output is not a single tensor")
            return out
        else:
            expr = _activation_expr(gm, node, env)
            if expr is not None:
                env[node] = expr
                continue
            args = [_sym_arg(a, env) for a in node.args]
            kwargs = {k: _sym_arg(v, env) for k, v in node.kwargs.items()}
            if node.op == "call_function" and node.target in _CALLS:
                env[node] = _CALLS[node.target](*args, **kwargs)
            elif node.op == "call_method" and node.target in _METHODS:
                env[node] = _METHODS[node.target](*args, **kwargs)
            else:
                raise NotExpressible(f"no sympy translation for {node.op} {node.target}")
    raise NotExpressible("graph has no output")  # pragma: no cover - fx graphs always have one


def _autograd_derivatives(name: str, fn: Fn) -> Derivatives:
    # Nested torch.func.grad of a sum gives the elementwise derivative of an elementwise function;
    # it works under torch.no_grad and traces under torch.compile.
    d1 = torch.func.grad(lambda u: fn(u).sum())
    d2 = torch.func.grad(lambda u: d1(u).sum())

    def ratio(u: Tensor) -> Tensor:
        g = d1(u)
        return torch.where(g != 0, d2(u) / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(g))

    return Derivatives(name, fn, d1, d2, ratio, "autograd", None)


def derivatives_of_callable(fn: Callable[[Tensor], Tensor], name: Optional[str] = None) -> Derivatives:
    """Derivatives of a user's elementwise function: sympy when translatable, else autograd."""
    label = name or getattr(fn, "__name__", None) or type(fn).__name__
    try:
        expr = sympy_of_callable(fn)
    except NotExpressible:
        return _autograd_derivatives(label, fn)
    return _from_expr(label, expr)

