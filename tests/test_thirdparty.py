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
    ("any_size_cnn", "other_size"),
}

C1 = "issue 16 class 1 (silently wrong at init)"
C2 = "issue 16 class 2 (layers not recognised)"
C3 = "issue 16 class 3 (structured inputs)"
C4 = "issue 16 class 4 (decoder caches, nn.Transformer masks)"
C5 = "issue 16 class 5 (compile)"
C6 = "issue 16 class 6 (export)"
C7 = "issue 16 class 7 (shapes fixed at capture)"
C8 = "issue 16 class 8, new (dropout in a fixed-point body: train-mode solves never converge)"

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


_DROPOUT = f"{C8}: the forward solve hits max_iter"
_BN_EVAL = f"{C5}: VJP graphs differentiate BatchNorm's running_mean (buffers passed as parameters)"
_BATCH1 = f"{C6}: a batch-1 example is specialised by torch.export (Dim min=1)"
_INPLACE = "issue 16, new: an in-place op on a fixed point's output trips autograd's version check"

_known("gpt2", "capture", f"{C4}: DynamicCache output; CaptureError hint talks about control flow")
_known("llama", "capture", f"{C4}: DynamicCache output; CaptureError hint talks about control flow")
_known("mamba", "capture", f"{C4}: DynamicCache output; CaptureError hint talks about control flow")
_known("transformer_causal", "capture", f"{C4}: _detect_is_causal_mask is a data-dependent bool")
_known("gpt2_no_cache", "transform", f"{C2}: Conv1D (addmm, transposed weight) is no layer: 'auto' finds no span")
_known("dcgan_generator", "transform", f"{C2}: ConvTranspose2d is no layer: 'auto' finds no span")
_known("dcgan_generator", "instrument", f"{C2}: ConvTranspose2d is no layer: nothing to probe")
_known("gat", "transform", f"{C2}: mm/matmul against a Parameter is no layer: 'auto' finds no span")
_known("gat", "instrument", f"{C2}: mm/matmul against a Parameter is no layer: nothing to probe")
_known("tv_vit", "transform", f"{C2}: 'auto' picks encoder -> conv_proj, a span it cannot bridge")
_known("word_lstm", "capture", f"{C3}: (ids, (h0, c0)) fails in placeholder_values; export is not tried")
_known("namedtuple_input", "capture", f"{C3}: a namedtuple fails in placeholder_values; export is not tried")
_known("rwkv", "equals", f"{C1}: differs from the original by O(1)")
_known("rwkv", "compile_infer", f"{C1}: compiled differs from eager")
_known("rwkv", "export_onnx", f"{C1}: ONNX differs from eager")
_known("rwkv", "train", f"{_INPLACE} (RWKV's state updates)")
_known("rwkv", "compile_train", f"{C5}: untyped 'leaf Variable ... in-place operation'")
for _m in ("bert", "t5_encoder", "mnist_cnn", "mnist_cnn_batch1", "mingpt"):
    _known(_m, "train", _DROPOUT)
_known("tv_resnet18", "train", "issue 16, new: BatchNorm in training mode makes the open-gate map non-contractive")
_known("tv_mobilenet_v3_small", "train", f"{_INPLACE} (inplace Hardswish/Dropout after the source layer)")
for _m in ("hf_resnet", "tv_resnet18", "tv_mobilenet_v3_small", "dcgan_discriminator"):
    _known(_m, "compile_infer", _BN_EVAL)
    _known(_m, "compile_train", _BN_EVAL)
_known("t5_encoder", "export_onnx", f"{C6}: ONNX decomposition fails at modeling_t5.py reshape(*input_shape, -1)")
for _m in ("mnist_cnn_batch1",):
    _known(_m, "export_pt2", _BATCH1)
    _known(_m, "export_onnx", _BATCH1)
_ALIAS = "two fixed-point inputs alias (rotary cos/sin views); torch.while_loop refuses aliasing inputs"
_known("llama_no_cache", "compile_infer", f"{C5}: untyped UncapturedHigherOrderOpError: {_ALIAS}")
_known("llama_no_cache", "compile_train", f"{C5}: untyped UncapturedHigherOrderOpError: {_ALIAS}")
_known("llama_no_cache", "export_pt2", f"{C6}: {_ALIAS}; the message blames aten.to.dtype")
_known("llama_no_cache", "export_onnx", f"{C6}: {_ALIAS}; the message blames aten.to.dtype")
_known("llama_no_cache", "train", "issue 16, new: the open-gate map is not contractive (RMSNorm): solves hit max_iter")
_known("mamba_no_cache", "compile_train", f"{C5}: untyped dynamo Unsupported 'torch.* op returned non-Tensor'")
_known("bert", "other_size", f"{C7}: export capture guards the sequence length")
_known("mingpt", "other_size", f"{C7}: export capture guards the sequence length")
_known("tv_resnet18", "other_size", f"{C7}: the fixed-point state is sized at capture")
_known("any_size_cnn", "other_size", f"{C7}: the fixed-point state is sized at capture")
# lstm_cell_loop: the cell-loop pass runs the loop on the temporal runtime (issue 18), every step passes


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
