"""Third-party model code through fxwormhole (issue 16): every model of tests/thirdparty/models.py
through every step of tests/thirdparty/steps.py, each step checked against the original model's
outputs (or, for compiled and exported artifacts, the eager transformed model's).

The same steps produce docs/coverage.md (``python bench/model_coverage.py``). Where the current code
fails a case, the case is marked ``xfail(strict=True)`` with the failure class of issue 16: it turns
into a failure the day it passes, and whoever fixed it removes the mark. A few cheap cases run in the
fast suite; the rest (``compile``, ``export``, training, big models) are ``slow``.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import fxwormhole as fw
from thirdparty import models, steps
from thirdparty.torchvision_shim import SHIMMED_OPS, import_torchvision

pytestmark = [pytest.mark.thirdparty, pytest.mark.usefixtures("one_thread")]

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
_MISSING = {"torchvision": not HAS_TORCHVISION, "transformers": not HAS_TRANSFORMERS}

# Cheap cases that run in `make test` (each a few seconds).
FAST = {
    ("mnist_cnn", "capture"), ("mnist_cnn", "transform"), ("mnist_cnn", "equals"),
    ("super_resolution", "equals"), ("any_size_cnn", "equals"), ("fast_neural_style", "equals"),
    ("namedtuple_input", "capture"), ("word_lstm", "capture"), ("dcgan_generator", "transform"),
    ("gpt2_no_cache", "transform"), ("gpt2", "capture"), ("transformer_causal", "capture"),
    ("any_size_cnn", "other_size"), ("mnist_cnn", "train"), ("word_lstm", "transform"),
}

# Classes 1-4, 7 and 8 of the survey are fixed (dropout in a body: passes/solve_dropout.py); the
# classes of what still fails:
C5 = "issue 16 class 5 (compile)"
C6 = "issue 16 class 6 (export)"

#: (model, step) -> why it fails on the current code. Filled from docs/coverage.md; a step blocked
#: by an earlier failure fails the same way and carries the earlier step's class.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _known(model: str, step: str, reason: str) -> None:
    KNOWN_FAILURES[(model, step)] = reason
    if step in ("capture", "transform"):
        _blocked(model, step, reason)


def _blocked(model: str, after: str, reason: str) -> None:
    """Every step that needs ``after`` fails with it."""
    for step in steps.STEPS:
        if step != after and (after in steps.NEEDS.get(step, ()) or
                              any(after in steps.NEEDS.get(n, ()) for n in steps.NEEDS.get(step, ()))):
            if models.MODELS[model].other_size is not None or step != "other_size":
                KNOWN_FAILURES.setdefault((model, step), f"{reason} (blocked by {after})")


_NOT_CONTRACTIVE = ("issue 16, new: the open-gate map is not contractive at proj_std=0.01 (Anderson at 200 "
                    "iterations still far from tol); the forward solve hits max_iter")
_PROBES = ("refused with a true typed hint: sensitivity probes measure nn.Linear/ConvNd/recurrent layers, "
           "not {}")

for _m in ("llama", "llama_no_cache", "rwkv", "tv_resnet18", "tv_mobilenet_v3_small"):
    _known(_m, "train", _NOT_CONTRACTIVE)
for _m in ("gpt2", "gpt2_no_cache"):
    _known(_m, "train", "issue 16, new: the adjoint solve does not reach tol 1e-6 in 50 iterations (open gates)")
    _known(_m, "compile_train", f"{C5}: untyped UncapturedHigherOrderOpError from the compiled backward")
_known("tv_vit", "train", "issue 16, new: no gradient reaches the wormhole parameters of the span 'auto' picks")
_known("dcgan_generator", "instrument", _PROBES.format("ConvTranspose2d"))
_known("gat", "instrument", _PROBES.format("a product against a Parameter"))
_known("tv_mobilenet_v3_small", "instrument", "issue 16, new: SensitivityInsert fails on an in-place Hardswish (typed, "
       "but the hint blames the inputs)")
_known("rwkv", "compile_infer", "issue 16, new: compiled differs from eager by 2e-3 (the unrolled WKV loop)")
_known("rwkv", "export_onnx", "issue 16, new: ONNX differs from eager by 6e-4 (the unrolled WKV loop)")
_known("rwkv", "compile_train", f"{C5}: untyped 'leaf Variable ... in-place operation' (RWKV's state updates)")
for _m in ("mamba", "mamba_no_cache"):
    _known(_m, "compile_train", f"{C5}: untyped dynamo Unsupported 'torch.* op returned non-Tensor'")
for _step in ("export_pt2", "export_onnx"):
    _known("gat", _step, f"{C6}: typed ExportError: the node count is the batch and the N x N adjacency "
           "specialises it (the hint says dynamic_batch=False)")
for _step in ("compile_infer", "compile_train"):
    _known("word_lstm", _step, f"{C5}: untyped TypeError: the compiled model loses the (h0, c0) argument "
           "('forward() missing 1 required positional argument')")
for _step in ("export_pt2", "export_onnx"):
    _known("word_lstm", _step, f"{C6}: typed ExportError: a model with temporal wormholes is refused (main), before that a "
           "data-dependent guard (Eq(u0, 1)) in the explicit LSTM")
_known("t5_encoder", "export_onnx", f"{C6}: ONNX decomposition fails at modeling_t5.py reshape(*input_shape, -1)")


def _family_missing(model: str) -> str | None:
    family = models.MODELS[model].family
    package = {"torchvision": "torchvision", "transformers": "transformers"}.get(family)
    return package if package and _MISSING[package] else None


def _cases():
    for model in models.names():
        for step in steps.STEPS:
            if step == "other_size" and models.MODELS[model].other_size is None:
                continue
            marks = [] if (model, step) in FAST else [pytest.mark.slow]
            missing = _family_missing(model)
            if missing:
                marks.append(pytest.mark.skip(reason=f"{missing} is not installed: pip install -e '.[dev]'"))
            reason = KNOWN_FAILURES.get((model, step))
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            yield pytest.param(model, step, marks=marks, id=f"{model}-{step}")


@pytest.mark.parametrize("model, step", list(_cases()))
def test_model_step(model, step):
    """The step passes its check against the reference (see tests/thirdparty/steps.py)."""
    steps.run_step(model, step)


# ------------------------------------------------------------------------------------------------
# eager implicit gradients against a float64 reference


def _open_gate_gradients(name: str, dtype: torch.dtype, solver: str, grad, tol: float, max_iter: int):
    model, inputs = models.build(name)
    model = model.to(dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    torch.manual_seed(0)  # the same random projections in every variant
    cfg = fw.WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.01, grad=grad,
                            solver=fw.SolverConfig(name=solver, tol=tol, max_iter=max_iter))
    net = fw.transform(model, inputs, cfg).eval()
    steps._loss(net(*inputs)).backward()
    return {n: p.grad.double() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("name, solver", [
    ("super_resolution", "anderson"), ("fast_neural_style", "picard"),
    pytest.param("fast_neural_style", "anderson", marks=pytest.mark.xfail(strict=True, reason=(
        "issue 16, new: float32 implicit gradients after an Anderson forward solve are off by ~0.1 of the "
        "largest gradient on this model (Picard: 2.5e-5; float64 Anderson: 2.6e-5)"))),
])
def test_eager_implicit_gradients_match_a_float64_unrolled_reference(name, solver):
    """Open gates, eval mode: float32 implicit gradients within 1e-3 of the largest gradient of
    float64 back-propagation through a fixed point solved to 1e-13."""
    reference = _open_gate_gradients(name, torch.float64, "picard", "unrolled", 1e-13, 300)
    got = _open_gate_gradients(name, torch.float32, solver, "implicit", 1e-5, 50)
    scale = max(float(g.abs().max()) for g in reference.values())
    assert set(got) == set(reference)
    worst = max(float((got[k] - reference[k]).abs().max()) for k in reference) / scale
    assert worst < 1e-3


# ------------------------------------------------------------------------------------------------
# the instrument itself


@pytest.mark.parametrize("name", ["mnist_cnn", "namedtuple_input", "word_lstm"])
def test_builders_are_deterministic_and_leave_the_global_rng_alone(name):
    before = torch.random.get_rng_state()
    (m1, x1), (m2, x2) = models.build(name), models.build(name)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not m1.training
    with torch.no_grad():
        assert steps.max_rel(m1(*x1), m2(*x2)) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_equals_step_catches_a_transform_that_changes_the_numbers(monkeypatch):
    """A deliberately broken transform (outputs scaled by 1 + 1e-4) is reported as WRONG."""
    real = fw.transform

    class Off(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args) * (1 + 1e-4)

    monkeypatch.setattr(fw, "transform", lambda *a, **k: Off(real(*a, **k)))
    with pytest.raises(steps.Mismatch, match=r"max relative error 0\.0001 > 1e-05"):
        steps.run_step("mnist_cnn", "equals")


def test_output_comparison_flattens_structures_and_refuses_different_ones():
    a = {"x": torch.ones(2, 3), "y": (torch.zeros(2), torch.arange(3))}
    b = {"x": torch.ones(2, 3) * (1 + 2e-5), "y": (torch.zeros(2), torch.arange(3))}
    assert steps.max_rel(b, a) == pytest.approx(2e-5, rel=1e-2)  # float32 rounding of 1 + 2e-5
    with pytest.raises(steps.Mismatch, match="2 tensors"):
        steps.max_rel((torch.ones(1), torch.ones(1)), (torch.ones(1), torch.ones(1), torch.ones(1)))
    with pytest.raises(steps.Mismatch, match="integer output"):
        steps.max_rel((torch.arange(3) + 1,), (torch.arange(3),))
    with pytest.raises(steps.Mismatch, match="not finite"):
        steps.max_rel((torch.tensor([float("nan")]),), (torch.tensor([1.0]),))


# ------------------------------------------------------------------------------------------------
# the torchvision shim


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed: pip install -e '.[dev]'")
@pytest.mark.parametrize("name", models.names("torchvision"))
def test_torchvision_models_dispatch_no_torchvision_op(name):
    """The shim only defines torchvision::nms/qnms; a model that dispatches no torchvision op
    computes exactly what it computes with torchvision's real C++ library."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Namespaces(TorchDispatchMode):
        seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.namespace)
            return func(*args, **(kwargs or {}))

    model, inputs = models.build(name)
    with torch.no_grad():
        expected = model(*inputs)
        with Namespaces() as mode:
            got = model(*inputs)
    assert "aten" in mode.seen and "torchvision" not in mode.seen
    assert steps.max_rel(got, expected) == 0.0


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed: pip install -e '.[dev]'")
def test_torchvision_ops_the_shim_defines_refuse_to_run():
    tv = import_torchvision()
    boxes, scores = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0])
    if tv.extension._has_ops():
        pytest.skip("torchvision's C++ ops loaded: the shim is not in use")
    for name in SHIMMED_OPS:
        with pytest.raises(RuntimeError, match=f"torchvision::{name} is unavailable"):
            getattr(torch.ops.torchvision, name)(boxes, scores, 0.5)
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        tv.ops.nms(boxes, scores, 0.5)


# ------------------------------------------------------------------------------------------------
# issue 16 class 5 at unit size: BatchNorm in eval mode inside a fixed point compiles


def test_compiled_backward_builds_for_a_body_with_batchnorm_in_eval_mode():
    """Eval-mode BatchNorm reads its running statistics, which have no derivative: the compiled
    backward's VJP graphs differentiate parameters only (they took every buffer and failed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    net = fw.transform(model, (x,), steps.open_gates()).eval()
    before = {k: v.clone() for k, v in net.named_buffers()}
    fw.compile.prepare(net, (x,))
    assert all(fp._graphs is not None for fp in net.fixed_point_modules().values())
    assert all(torch.equal(v, before[k]) for k, v in net.named_buffers())
