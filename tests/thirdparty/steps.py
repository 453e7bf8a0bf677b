"""What a user does with a third-party model, one step at a time, each checked against a reference.

Every step takes a model name of :data:`.models.MODELS`, builds the model afresh, runs what the step
needs and checks the numbers. A step returns a short detail string when it passed, raises
:class:`Mismatch` when it ran but computed wrong numbers, and lets any other exception (a typed
``FxWormholeError`` or an untyped torch error) propagate for the caller to classify. The tests
(``tests/test_thirdparty.py``) and ``bench/model_coverage.py`` share these steps.

References:

* ``capture``, ``transform``/``equals``, ``instrument``, ``other_size``: the original model's outputs
  on the same inputs (tolerance :data:`RTOL`, relative to the largest output magnitude);
* ``train``: each fixed-point body is a function of its arguments (two evaluations at the last
  point agree), the solver's own residuals (forward and adjoint converged, more than one iteration),
  finite gradients that reach every wormhole parameter, finite outputs after an optimizer step;
* ``compile_*`` and ``export_*``: the eager transformed model with open gates (the loop really
  iterates), tolerance :data:`RTOL_COMPILED`; gradients compiled vs eager for ``compile_train``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import models

__all__ = ["Mismatch", "STEPS", "RTOL", "RTOL_COMPILED", "OPEN_GATES", "tensors", "max_rel", "run_step"]

RTOL = 1e-5           # "equals the original at init"
RTOL_COMPILED = 1e-4  # Inductor/ONNX reorder float ops; fixed points are solved to tol 1e-5


class Mismatch(AssertionError):
    """The step ran but its numbers are wrong (the message says by how much)."""


def _fw():
    import fxwormhole

    return fxwormhole


def open_gates():
    """The training configuration: gates half open (logit 0), projections random and small."""
    return _fw().WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.01)


OPEN_GATES = "WormholeConfig(gate_init=0.0, proj_init='normal', proj_std=0.01)"


# ------------------------------------------------------------------------------------------------
# comparing outputs


def tensors(out: Any) -> list[Tensor]:
    """Every tensor of a (possibly structured) model output, in a fixed order.

    Pytree containers (tuples, dicts, namedtuples, transformers' ``ModelOutput``) are flattened; a
    key/value cache object (transformers' ``DynamicCache``, not a pytree) contributes its keys and
    values, so a cache computed wrongly is caught too.
    """
    found: list[Tensor] = []
    for leaf in torch.utils._pytree.tree_leaves(out):
        if isinstance(leaf, Tensor):
            found.append(leaf)
        elif hasattr(leaf, "layers") and isinstance(getattr(leaf, "layers"), (list, tuple)):
            for layer in leaf.layers:
                found.extend(t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                             if isinstance(t, Tensor))
    return found


def max_rel(got: Any, expected: Any) -> float:
    """Largest ``|got - expected|`` over all output tensors, relative to the largest ``|expected|``.

    Raises :class:`Mismatch` when the outputs differ in structure, shape or dtype.
    """
    g, e = tensors(got), tensors(expected)
    if len(g) != len(e):
        raise Mismatch(f"output has {len(g)} tensors, the reference {len(e)}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(g, e)):
        if a.shape != b.shape:
            raise Mismatch(f"output tensor {i} has shape {tuple(a.shape)}, the reference {tuple(b.shape)}")
        if not b.is_floating_point():
            if not torch.equal(a, b):
                raise Mismatch(f"integer output tensor {i} differs")
            continue
        a, b = a.detach().double(), b.detach().double()
        if not torch.isfinite(a).all():
            raise Mismatch(f"output tensor {i} is not finite")
        scale = b.abs().max().clamp_min(1e-12)
        worst = max(worst, float((a - b).abs().max() / scale))
    return worst


def _check_close(got: Any, expected: Any, rtol: float, what: str) -> str:
    err = max_rel(got, expected)
    if not err <= rtol:
        raise Mismatch(f"{what}: max relative error {err:.3g} > {rtol:g}")
    return f"rel err {err:.1e}"


def _call(model: Callable, inputs: tuple, *, grad: bool = False) -> Any:
    with torch.set_grad_enabled(grad):
        return model(*inputs)


# ------------------------------------------------------------------------------------------------
# steps


def step_capture(name: str) -> str:
    model, inputs = models.build(name)
    gm = _fw().capture(model, inputs)
    front = gm.meta.get("fxwormhole", {}).get("front_end", "?")
    return f"{front}; " + _check_close(_call(gm, inputs), _call(model, inputs), RTOL, "captured graph vs original")


def _transformed(name: str, config=None, *, train: bool = False):
    model, inputs = models.build(name)
    model.train(train)
    return model, inputs, _fw().transform(model, inputs, config)


def _describe(net) -> str:
    temporal = sum(len(getattr(m, "temporal_pairs", ())) for m in net.modules())
    text = f"{len(net.wormholes)} wormholes, {len(net.fixed_point_modules())} fixed points"
    return text + (f", {temporal} temporal wormholes" if temporal else "")


def step_transform(name: str) -> str:
    _, _, net = _transformed(name)
    return _describe(net)


def step_equals(name: str) -> str:
    model, inputs, net = _transformed(name)
    return _check_close(_call(net, inputs), _call(model, inputs), RTOL, "transformed (gates closed) vs original")


def _all_stats(net) -> dict[str, Any]:
    return {k: v for k, v in net.fixed_point_stats().items() if v is not None}


def _wormhole_params(net: nn.Module) -> dict[str, nn.Parameter]:
    # feed-forward wormholes are "wormhole_<i>", temporal ones "temporal_wormholes.<pair>"
    return {n: p for n, p in net.named_parameters() if any("wormhole" in part for part in n.split("."))}


def _loss(out: Any) -> Tensor:
    floats = [t for t in tensors(out) if t.is_floating_point() and t.requires_grad]
    if not floats:
        raise Mismatch("no output requires grad")
    return sum(t.float().pow(2).mean() for t in floats)


def _record_body_calls(net: nn.Module) -> dict[str, tuple]:
    """Remember the arguments of the last call of every fixed point's body."""
    seen: dict[str, tuple] = {}
    for path, fp in net.fixed_point_modules().items():
        def hook(module, args, out, path=path):
            seen[path] = tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args)
        fp.body.register_forward_hook(hook)
    return seen


def _check_deterministic_bodies(net: nn.Module, seen: dict[str, tuple]) -> None:
    """A fixed point is only defined if the body is a function of its arguments: evaluate each body
    twice at its last point. (With dropout in train mode every evaluation draws new masks, so a
    solve that "converges" does so only when the noise happens to fall below tol.)"""
    for path, args in seen.items():
        body = net.fixed_point_modules()[path].body
        with torch.no_grad():
            first, second = body(*args), body(*args)
        err = max_rel(second, first)
        if err > RTOL:
            raise Mismatch(f"{path}: the body is not deterministic in train mode: two evaluations at the same point "
                           f"differ by {err:.2g} (relative), e.g. dropout draws new masks at every iteration")


def step_train(name: str) -> str:
    from fxwormhole.runtime.stats import CONVERGED

    _, inputs, net = _transformed(name, open_gates(), train=True)
    net.train()
    params = _wormhole_params(net)
    if not params:
        raise Mismatch("the transformed model has no wormhole parameters")
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    seen = _record_body_calls(net)
    out = _call(net, inputs, grad=True)
    _check_deterministic_bodies(net, seen)
    loss = _loss(out)
    loss.backward()
    stats = _all_stats(net)
    if not stats:
        raise Mismatch("no fixed-point statistics after a forward pass")
    iterations = 0.0
    for path, s in stats.items():
        if not bool((s.status == CONVERGED).all()):
            raise Mismatch(f"{path}: forward solve did not converge (status {s.status.flatten().tolist()[:8]})")
        if s.backward_status is None or not bool((s.backward_status == CONVERGED).all()):
            raise Mismatch(f"{path}: adjoint solve did not converge or did not run")
        iterations = max(iterations, float(s.iterations.float().mean()))
    if iterations <= 1:
        raise Mismatch("gates are open but every fixed point settled in 1 iteration (the wormholes do nothing)")
    bad = [n for n, p in net.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise Mismatch(f"non-finite gradients in {bad[:3]}")
    dead = [n for n, p in params.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    if dead:
        raise Mismatch(f"no gradient reaches wormhole parameters {dead[:3]}")
    opt.step()
    after = tensors(_call(net, inputs))
    if not all(torch.isfinite(t).all() for t in after if t.is_floating_point()):
        raise Mismatch("outputs are not finite after one SGD step")
    return f"loss {float(loss):.3g}, {iterations:.1f} iterations"


def step_instrument(name: str) -> str:
    model, inputs = models.build(name)
    gm = _fw().instrument(model, inputs)
    from fxwormhole.runtime.sensitivity import probes_of

    probes = len(probes_of(gm))
    return f"{probes} probes; " + _check_close(_call(gm, inputs), _call(model, inputs), RTOL, "instrumented vs original")


def _open_eval(name: str):
    model, inputs, net = _transformed(name, open_gates())
    return inputs, net.eval()


def step_compile_infer(name: str) -> str:
    inputs, net = _open_eval(name)
    expected = _call(net, inputs)
    fast = _fw().compile(net)
    return _check_close(_call(fast, inputs), expected, RTOL_COMPILED, "compiled (no_grad) vs eager")


def _grads(net: nn.Module, out: Any) -> dict[str, Tensor]:
    net.zero_grad(set_to_none=True)
    _loss(out).backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def step_compile_train(name: str) -> str:
    """Compiled forward + backward in eval mode (deterministic: no dropout, BatchNorm statistics
    fixed); gradients compared with the eager ones."""
    inputs, net = _open_eval(name)
    eager_out = _call(net, inputs, grad=True)
    eager = _grads(net, eager_out)
    fast = _fw().compile(net)
    out = _call(fast, inputs, grad=True)
    compiled = _grads(net, out)
    detail = _check_close(out, eager_out, RTOL_COMPILED, "compiled forward vs eager")
    if set(compiled) != set(eager):
        raise Mismatch(f"gradients of {sorted(set(eager) ^ set(compiled))[:3]} only on one side")
    # Errors are relative to each gradient's size, but never to less than 1e-2 of the largest: the
    # solves stop at tol 1e-5 (forward) / 1e-6 (adjoint), so eager float32 gradients are themselves
    # only good to ~1e-5 of the largest (ViT: 1.8e-6 against a float64 reference), and a gradient
    # that is zero in exact arithmetic (a key bias under softmax) is pure rounding noise.
    floor = 1e-2 * max((float(g.abs().max()) for g in eager.values()), default=0.0)
    worst = max((float((compiled[k] - eager[k]).abs().max()) / max(float(eager[k].abs().max()), floor, 1e-30)
                 for k in eager), default=0.0)
    if not worst <= 1e-3:
        raise Mismatch(f"compiled gradients vs eager: max relative error {worst:.3g} > 1e-3")
    return f"{detail}; grads rel err {worst:.1e}"


def _export(name: str, fmt: str) -> str:
    inputs, net = _open_eval(name)
    expected = _call(net, inputs)
    fw = _fw()
    with tempfile.TemporaryDirectory() as tmp:
        path = fw.export(net, inputs, Path(tmp) / f"model.{fmt}", format=fmt)
        runner = fw.export.load(path)
        got = _call(runner, inputs)
    return _check_close(got, expected, RTOL_COMPILED, f"{fmt} artifact vs eager")


def step_export_pt2(name: str) -> str:
    return _export(name, "pt2")


def step_export_onnx(name: str) -> str:
    return _export(name, "onnx")


def step_other_size(name: str) -> str:
    other = models.other_size_inputs(name)
    if other is None:
        raise LookupError(f"{name} has no second input size")
    model, _, net = _transformed(name)
    return _check_close(_call(net, other), _call(model, other), RTOL, "transformed vs original at another size")


#: step name -> (function, steps whose failure makes it moot)
STEPS: dict[str, Callable[[str], str]] = {
    "capture": step_capture,
    "transform": step_transform,
    "equals": step_equals,
    "train": step_train,
    "instrument": step_instrument,
    "compile_infer": step_compile_infer,
    "compile_train": step_compile_train,
    "export_pt2": step_export_pt2,
    "export_onnx": step_export_onnx,
    "other_size": step_other_size,
}

#: a step is only attempted when these steps passed (else it is "blocked")
NEEDS: dict[str, tuple[str, ...]] = {
    "transform": ("capture",), "instrument": ("capture",), "equals": ("transform",), "train": ("transform",), "compile_infer": ("transform",),
    "compile_train": ("transform",), "export_pt2": ("transform",), "export_onnx": ("transform",),
    "other_size": ("transform",),
}


def run_step(name: str, step: str) -> str:
    """Run one step on one model (see the module docstring for what it returns and raises).

    The random stream is seeded (random projections, dropout), so the bench and the tests see the
    same numbers; the caller's stream is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return STEPS[step](name)
