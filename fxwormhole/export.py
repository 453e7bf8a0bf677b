"""``fxwormhole.export(model, example_inputs, path)``: inference artifacts (``.pt2`` and ONNX).

* ``format="pt2"``: ``torch.export.export(strict=False)`` of the model in eval mode under
  ``no_grad``; every fixed point becomes one ``torch.ops.higher_order.while_loop``; saved with
  ``torch.export.save``.
* ``format="onnx"``: the same ExportedProgram through ``torch.onnx.export(dynamo=True)``; the
  ``while_loop`` becomes an ONNX ``Loop`` (needs ``pip install fxwormhole[onnx]``).

Exported artifacts are **inference-only**: ``torch.export`` keeps the forward ``while_loop`` but
drops the custom implicit backward, and back-propagating through the exported loop would use
torch's native ``while_loop`` autograd, which is BPTT and silently wrong when the initial carry
does not require grad (shared/research/torch-tooling.md sections 3.3 and 4). :func:`load` returns a
wrapper that refuses every attempt to train; train the TransformedModule and export again.

With ``dynamic_batch=True`` dimension 0 of every tensor input is one symbolic batch size.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, ExportError

__all__ = ["export", "load", "ExportedModel", "FORMATS"]

FORMATS = ("pt2", "onnx")
_META_FILE = "fxwormhole.json"
_INFERENCE_ONLY = ("exported artifacts are inference-only (torch.export drops the fixed point's implicit "
                   "backward); train the TransformedModule instead and export it again")


# ------------------------------------------------------------------------------------------------
# export
def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(f"fxwormhole.export: example_inputs must be a Tensor or a tuple of Tensors, "
                      f"got {type(example_inputs).__name__}")


def _dynamic_shapes(inputs: tuple, dynamic_batch: bool):
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return tuple({0: batch} if isinstance(t, Tensor) and t.dim() > 0 else None for t in inputs)


def _where(exc: BaseException) -> str:
    """The user-code location or op an export error message points at (best effort)."""
    text = str(exc)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)', text)
    user = [f for f in frames if "/torch/" not in f[0]]
    if user:
        path, line, fn, code = user[-1]
        return f" at {Path(path).name}:{line} in {fn} ({code.strip()})"
    op = re.search(r"(aten\.[\w.]+|torch\.ops\.[\w.]+|call_function \w+|node \w+)", text)
    return f" at {op.group(1)}" if op else ""


def _one_line(exc: BaseException) -> str:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {first[:300]}"


class _InferenceMode:
    """Eval mode (per-module flags restored) and no_grad while exporting; ``model`` is left as found."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        # The compiled path writes stats tensors on the FixedPoint; export's would be stale tracer values.
        self.cstats = {m: dict(m._cstats) for m in self.model.modules() if isinstance(getattr(m, "_cstats", None), dict)}
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.filterwarnings("ignore", message=r".*were assigned during export")
        self.model.eval()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        return self

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad)
        for m, mode in self.modes.items():
            m.training = mode
        for m, stats in self.cstats.items():
            m._cstats.clear()
            m._cstats.update(stats)
        self.warnings.__exit__(*exc)
        return False


def export_program(model: nn.Module, example_inputs: Any, *, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export(strict=False)`` of ``model`` in eval mode, errors as ExportError."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fxwormhole.export: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, ExportedModel):
        raise ExportError("fxwormhole.export: model is already an exported artifact; export the TransformedModule")
    inputs = _as_tuple(example_inputs)
    with _InferenceMode(model):
        try:
            return torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch),
                                       strict=False)
        except Exception as exc:  # noqa: BLE001 - torch.export fails in many ways; wrap them all
            hint = ("the batch dimension was specialised by the model: export with dynamic_batch=False, or "
                    "remove the code that depends on the batch size" if "batch" in str(exc) and dynamic_batch
                    else "rewrite the named op/line so torch.export can trace it (no data-dependent Python "
                         "control flow outside FixedPoint nodes)")
            raise ExportError(f"torch.export failed{_where(exc)}: {_one_line(exc)}; {hint}") from exc


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the onnx extra ({exc.name or 'onnx'} is missing): "
                          "pip install fxwormhole[onnx]") from None


def _onnx_translations() -> dict:
    """ONNX for ops the exporter lacks: the fixed-point loop tracks its best residual with
    ``torch.fmin`` (NaN-ignoring minimum), which has no torchlib translation in torch 2.13."""
    from onnxscript import opset18 as op

    def fmin(a, b):
        return op.Where(op.IsNaN(b), a, op.Where(op.IsNaN(a), b, op.Min(a, b)))

    def fmax(a, b):
        return op.Where(op.IsNaN(b), a, op.Where(op.IsNaN(a), b, op.Max(a, b)))

    ops = torch.ops
    return {ops.prims.fmin.default: fmin, ops.aten.fmin.default: fmin,
            ops.prims.fmax.default: fmax, ops.aten.fmax.default: fmax}


def export(model: nn.Module, example_inputs: Any, path: str | Path, format: str = "pt2", *,
           dynamic_batch: bool = True) -> Path:
    """Export ``model`` for inference to ``path`` (``.pt2`` or ``.onnx``); returns the path.

    Args:
        model: a :class:`~fxwormhole.transformed.TransformedModule` (or any nn.Module; fixed points
            are exported as ``while_loop``). It is exported in eval mode; its own mode is kept.
        example_inputs: a tensor or tuple of tensors (batch dim 0).
        path: output file.
        format: ``"pt2"`` (``torch.export.save``) or ``"onnx"`` (``while_loop`` -> ONNX ``Loop``).
        dynamic_batch: keep dim 0 of every input symbolic (any batch size at run time).

    Raises:
        ExportError: tracing or conversion failed (names the op/line and what to do), or the
            onnx extra is missing.

    Example::

        fxwormhole.export(net, (x,), "net.pt2")
        runner = fxwormhole.export.load("net.pt2")   # inference only
        y = runner(x)
    """
    if format not in FORMATS:
        raise ConfigError(f"fxwormhole.export: format={format!r} is invalid: expected one of {FORMATS}")
    if format == "onnx":
        _require_onnx()
    path = Path(path)
    inputs = _as_tuple(example_inputs)
    ep = export_program(model, inputs, dynamic_batch=dynamic_batch)
    meta = {"format": format, "dynamic_batch": dynamic_batch, "inference_only": True,
            "inputs": [[list(t.shape), str(t.dtype)] for t in inputs if isinstance(t, Tensor)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "pt2":
        torch.export.save(ep, str(path), extra_files={_META_FILE: json.dumps(meta)})
        return path
    try:
        onx = torch.onnx.export(ep, inputs, dynamo=True, verbose=False,
                                custom_translation_table=_onnx_translations())
        onx.save(str(path))
    except Exception as exc:  # noqa: BLE001 - ConversionError and friends
        raise ExportError(f"ONNX conversion failed{_where(exc)}: {_one_line(exc)}; export format='pt2' instead, "
                          "or replace the op named above by one ONNX supports") from exc
    return path


# ------------------------------------------------------------------------------------------------
# load
class _RefuseBackward(torch.autograd.Function):
    """Identity whose backward raises: ``loss.backward()`` through an exported artifact fails loudly."""

    @staticmethod
    def forward(ctx, anchor, *outs):
        return tuple(o.clone() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        raise ExportError(f"backward through an exported model: {_INFERENCE_ONLY}")


class ExportedModel(nn.Module):
    """An exported artifact, loaded for inference (see :func:`load`).

    ``train()`` / ``train(True)``, inputs or parameters that require grad, and ``backward()``
    through its outputs raise :class:`ExportError`. ``eval()`` is allowed.
    """

    def __init__(self, runner: Any, *, path: Path, format: str, meta: dict) -> None:
        super().__init__()
        if isinstance(runner, nn.Module):  # the exported program's module: frozen
            for p in runner.parameters():
                p.requires_grad_(False)
        self._runner = runner
        self.path, self.format, self.meta = path, format, meta
        self.training = False

    def train(self, mode: bool = True) -> "ExportedModel":
        if mode:
            raise ExportError(f"{self.path}: .train() on an exported model: {_INFERENCE_ONLY}")
        self.training = False
        return self

    def forward(self, *inputs: Tensor) -> Any:
        if torch.is_grad_enabled():
            if any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
                raise ExportError(f"{self.path}: an input requires grad: {_INFERENCE_ONLY}")
            trainable = [n for n, p in self.named_parameters() if p.requires_grad]
            if trainable:
                raise ExportError(f"{self.path}: parameters {trainable[:3]} require grad: {_INFERENCE_ONLY}")
        with torch.no_grad():
            out = self._runner(*inputs)
        if not torch.is_grad_enabled():
            return out
        flat, spec = torch.utils._pytree.tree_flatten(out)
        idx = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.is_floating_point()]
        guarded = _RefuseBackward.apply(torch.zeros((), requires_grad=True), *[flat[i] for i in idx])
        for i, t in zip(idx, guarded):
            flat[i] = t
        return torch.utils._pytree.tree_unflatten(flat, spec)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, format={self.format!r}, inference_only=True"


class _OrtRunner:
    """Runs an ONNX file with onnxruntime; tensors in, tensors out."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running an ONNX export needs onnxruntime: pip install fxwormhole[onnx]") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{path}: onnxruntime cannot load it ({_one_line(exc)}); re-export it") from None
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Tensor) -> Any:
        if len(inputs) != len(self.names):
            raise ExportError(f"the ONNX model takes {len(self.names)} inputs {self.names}, got {len(inputs)}")
        feed = {n: t.detach().cpu().numpy() for n, t in zip(self.names, inputs)}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def load(path: str | Path) -> ExportedModel:
    """Load a ``.pt2`` or ``.onnx`` file written by :func:`export` as an inference-only module."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file; write it with fxwormhole.export(model, inputs, path)")
    if path.suffix == ".onnx":
        return ExportedModel(_OrtRunner(path), path=path, format="onnx", meta={"format": "onnx"})
    extra = {_META_FILE: ""}
    try:
        ep = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise ExportError(f"{path}: not a readable torch.export archive ({_one_line(exc)}); "
                          "re-export it with fxwormhole.export") from None
    meta = json.loads(extra[_META_FILE]) if extra[_META_FILE] else {"format": "pt2"}
    return ExportedModel(ep.module(), path=path, format="pt2", meta=meta)


export.load = load  # type: ignore[attr-defined]  # reachable as fxwormhole.export.load
