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

With ``dynamic_batch=True`` dimension 0 of every tensor input is one symbolic batch size. A batch-1
example is traced at batch 2 (every batched input repeated; torch.export specialises a size-1 dim)
and the program is then checked against the model at batch 1.

Files are written atomically (:mod:`fxwormhole._atomic`): a failure leaves an existing file at the
path unchanged. Every artifact carries SHA-256 checksums of its weights and program (a ``.pt2``:
one per archive record, in ``extra/fxwormhole.json``; an ``.onnx``: weights and graph, in the
model's ``metadata_props``) and :func:`load` verifies them, so a damaged or modified file is refused
instead of computing wrong numbers.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from ._atomic import atomic_write, check_target
from .errors import ConfigError, ExportError

__all__ = ["export", "load", "prepare_export", "ExportedModel", "FORMATS"]

FORMATS = ("pt2", "onnx")
_META_FILE = "fxwormhole.json"
_META_RECORD = f"extra/{_META_FILE}"
_ONNX_CHECKSUM_KEY = "fxwormhole.sha256"
_REEXPORT = "re-export it with fxwormhole.export (or restore it from a copy)"
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


def _batched(t: Any) -> bool:
    return isinstance(t, Tensor) and t.dim() > 0


def _dynamic_shapes(inputs: tuple, dynamic_batch: bool):
    """Dim 0 of every tensor symbolic, in the structure of ``inputs`` (a namedtuple argument gets
    a namedtuple of specs: torch.export matches the two structures)."""
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return tuple(tree_map(lambda t: {0: batch} if _batched(t) else None, x) for x in inputs)


def _batch_of_one(inputs: tuple) -> bool:
    batched = [t for t in tree_leaves(inputs) if _batched(t)]
    return bool(batched) and all(t.shape[0] == 1 for t in batched)


def _doubled(inputs: tuple) -> tuple:
    """The example with every batched input repeated to batch 2: torch.export specialises a size-1
    dim (1 broadcasts, so it cannot stand for any size) and would refuse a dynamic batch."""
    return tree_map(lambda t: torch.cat([t, t]) if _batched(t) else t, inputs)


_FXWORMHOLE_DIR = str(Path(__file__).resolve().parent)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _where(exc: BaseException) -> str:
    """The user-code location or op an export error message points at (best effort).

    The deepest frame the message quotes that is neither torch's nor fxwormhole's own (the
    model's code); else the node torch names as the one it was executing; else nothing (a
    location inside the solver loop or an op merely mentioned in the text would mislead).
    """
    text = _plain(str(exc))
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)', text)
    user = [f for f in frames if "/torch/" not in f[0] and not str(Path(f[0]).resolve()).startswith(_FXWORMHOLE_DIR)
            and "site-packages/torch" not in f[0]]
    if user:
        path, line, fn, code = user[-1]
        return f" at {Path(path).name}:{line} in {fn} ({code.strip()})"
    node = re.search(r"[Ww]hile executing %(\w+) : \[num_users=\d+\] = call_function\[target=([\w.]+)\]", text)
    return f" at node {node.group(1)} ({node.group(2)})" if node else ""


def _plain(text: str) -> str:
    """``text`` without terminal colour codes (torch.onnx colours its messages)."""
    return _ANSI.sub("", text)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in _plain(str(exc)).splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    if first.endswith(":") and len(lines) > 1:  # "... Got graph break/error:" says what only on the next line
        first = f"{first} {lines[1]}"
    return f"{type(exc).__name__}: {first[:300]}"


def _export_hint(exc: BaseException, dynamic_batch: bool) -> str:
    """What to do about a torch.export failure, true for the cause the message names."""
    text = str(exc)
    if "aliasing during higher order op tracing" in text:
        return ("two inputs of a fixed point are views of one tensor (e.g. rotary cos/sin tables) and "
                "torch.while_loop refuses aliasing inputs; fxwormhole does not yet copy them before the loop "
                "(issue 16, class 5), so this transformed model cannot be exported yet")
    if "batch" in text and dynamic_batch:
        return ("the batch dimension was specialised by the model: export with dynamic_batch=False, or remove "
                "the code that depends on the batch size")
    return ("rewrite the named op/line so torch.export can trace it (no data-dependent Python control flow "
            "outside FixedPoint nodes)")


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
    one = dynamic_batch and _batch_of_one(inputs)
    traced = _doubled(inputs) if one else inputs
    with _InferenceMode(model):
        try:
            ep = torch.export.export(model, traced, dynamic_shapes=_dynamic_shapes(traced, dynamic_batch),
                                     strict=False)
        except Exception as exc:  # noqa: BLE001 - torch.export fails in many ways; wrap them all
            raise ExportError(f"torch.export failed{_where(exc)}: {_one_line(exc)}; "
                              f"{_export_hint(exc, dynamic_batch)}") from exc
        if one:
            _check_batch_of_one(model, ep, inputs)
    return ep


def _check_batch_of_one(model: nn.Module, ep: torch.export.ExportedProgram, inputs: tuple) -> None:
    """The program traced at batch 2 must compute, at the example's batch of 1, what the model does."""
    expected = torch.utils._pytree.tree_leaves(model(*inputs))
    try:
        got = torch.utils._pytree.tree_leaves(ep.module()(*inputs))
    except Exception as exc:  # noqa: BLE001 - the program refuses batch 1
        raise ExportError(f"torch.export traced the model at batch 2 (a batch-1 example pins the batch to 1), but "
                          f"the program fails at batch 1: {_one_line(exc)}; export with dynamic_batch=False, or "
                          f"with a batch-2 example") from exc
    for a, b in zip(got, expected):
        if isinstance(b, Tensor) and b.is_floating_point():
            err, scale = float((a - b).abs().max()), float(b.abs().max())
            if not err <= 1e-3 * scale + 1e-6:
                raise ExportError(f"torch.export traced the model at batch 2 (a batch-1 example pins the batch to 1), "
                                  f"and the program differs from the model at batch 1 by {err:.3g} (outputs up to "
                                  f"{scale:.3g}); export with dynamic_batch=False to trace the example as it is")


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
        ExportError: tracing or conversion failed (names the op/line and what to do), the onnx
            extra is missing, or the file could not be written (its directory is missing, disk
            full, no permission, ...). The file is written atomically: on any failure an
            existing file at ``path`` is unchanged and no temporary file is left behind.

    Example::

        fxwormhole.export(net, (x,), "net.pt2")
        runner = fxwormhole.export.load("net.pt2")   # inference only
        y = runner(x)
    """
    _check_format(format)
    what = _WHAT[format]
    path = check_target(path, what, ExportError)  # a bad path fails before the (slow) export
    write = prepare_export(model, example_inputs, format, dynamic_batch=dynamic_batch)
    with atomic_write(path, what=what, error=ExportError) as tmp:
        write(tmp)
    return path


_WHAT = {"pt2": "the exported program", "onnx": "the ONNX model"}


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"fxwormhole.export: format={format!r} is invalid: expected one of {FORMATS}")
    if format == "onnx":
        _require_onnx()


def prepare_export(model: nn.Module, example_inputs: Any, format: str = "pt2", *,
                   dynamic_batch: bool = True) -> Callable[[Path], None]:
    """Do all the work of :func:`export` that can fail before a file is touched (tracing, ONNX
    conversion); returns ``write(path)``, which writes the artifact with its checksums to ``path``
    as is. :func:`export` calls it inside an atomic write; so does ``fxwormhole export``, which
    also loads and checks the artifact before it replaces the user's file."""
    _check_format(format)
    _refuse_temporal_wormholes(model)
    inputs = _as_tuple(example_inputs)
    ep = export_program(model, inputs, dynamic_batch=dynamic_batch)
    if format == "onnx":
        proto = _onnx_proto(ep, inputs)
        return lambda path: _write_onnx(proto, path)
    meta = {"format": format, "dynamic_batch": dynamic_batch, "inference_only": True,
            "inputs": [[list(t.shape), str(t.dtype)] for t in inputs if isinstance(t, Tensor)]}
    return lambda path: _write_pt2(ep, path, meta)


def _refuse_temporal_wormholes(model: nn.Module) -> None:
    """torch.export cannot trace the per-step solve of temporal wormholes yet (its while_loop meets
    aliased carries), open or closed: say so before tracing, instead of a torch.export error whose
    'rewrite the named line' points into fxwormhole's own runtime."""
    from .runtime.cell_loop import CellLoop
    from .runtime.recurrent import ExplicitRecurrent
    from .transformed import public_name

    held = [public_name(path) or type(model).__name__ for path, m in model.named_modules()
            if (isinstance(m, ExplicitRecurrent) and m.temporal_pairs) or isinstance(m, CellLoop)]
    if held:
        raise ExportError(
            f"fxwormhole.export: {', '.join(repr(h) for h in held[:3])} {'has' if len(held) == 1 else 'have'} temporal "
            "wormholes, whose per-step solve torch.export cannot trace yet (fxwormhole's recurrent runtime, not your "
            "code); keep the transformed model in PyTorch (fxwormhole.save / fxwormhole.load), or export the model "
            "transformed without temporal wormholes")


# ------------------------------------------------------------------------------------------------
# checksums
def _sha256_of_record(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    digest = hashlib.sha256()
    with archive.open(info) as f:  # zipfile checks the record's CRC while reading
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record_name(info: zipfile.ZipInfo) -> str:
    """A record's name without the archive's top folder (``archive/data/weights/w0`` -> ``data/...``)."""
    return info.filename.partition("/")[2]


def _pt2_records(archive: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    records: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = _record_name(info)
        if name in records:  # which copy torch would read is unspecified: refuse
            raise ExportError(f"{path}: the archive holds two records named {name!r}, so it was modified "
                              f"after fxwormhole.export wrote it; {_REEXPORT}")
        records[name] = info
    return records


def _pt2_digests(archive: zipfile.ZipFile, records: dict[str, zipfile.ZipInfo]) -> dict[str, str]:
    """SHA-256 of every record but the extra files (weights, constants, program, format records)."""
    return {name: _sha256_of_record(archive, info) for name, info in sorted(records.items())
            if not name.startswith("extra/") and not info.is_dir()}


def _register_namedtuples(spec: Any) -> None:
    """Give every namedtuple class of an input structure the serialised name ``module.QualName``
    that ``torch.export.save`` requires. (Loading such a file in another process needs the same
    registration: torch.utils._pytree._register_namedtuple.)"""
    from torch.utils._pytree import SUPPORTED_SERIALIZED_TYPES, _register_namedtuple

    cls = getattr(spec, "context", None)  # a namedtuple node: type collections.namedtuple, context the class
    if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields") \
            and cls not in SUPPORTED_SERIALIZED_TYPES:
        _register_namedtuple(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    for child in getattr(spec, "children_specs", ()):
        _register_namedtuples(child)


def _write_pt2(ep: torch.export.ExportedProgram, tmp: Path, meta: dict) -> None:
    """``torch.export.save`` and then the metadata record, which holds the checksums of all others."""
    for entry in ep.module_call_graph:
        if entry.signature is not None:
            _register_namedtuples(entry.signature.in_spec)
    with open(tmp, "wb") as f:
        torch.export.save(ep, f)
    with zipfile.ZipFile(tmp, "a") as archive:  # records stay uncompressed, as torch writes them
        records = _pt2_records(archive, tmp)
        top = next(iter(records.values())).filename.partition("/")[0]
        meta = {**meta, "sha256": _pt2_digests(archive, records)}
        archive.writestr(f"{top}/{_META_RECORD}", json.dumps(meta))


def _what_record(name: str) -> str:
    if name.startswith("data/weights/"):
        return "a weight"
    if name.startswith("data/constants/"):
        return "a constant"
    if name.startswith("models/"):
        return "the program"
    return "an archive record"


def _unreadable(path: Path, exc: OSError) -> ExportError:
    return ExportError(f"{path}: cannot read it ({exc.strerror or exc}); check that the file is readable")


def _no_checksum(path: Path, why: str) -> None:
    warnings.warn(f"{path}: {why}, so its weights and program cannot be verified; re-export it with "
                  "fxwormhole.export to add a checksum", UserWarning, stacklevel=4)


def _verify_pt2(path: Path) -> dict:
    """Check every record against the checksums in ``fxwormhole.json``; returns that metadata."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = _pt2_records(archive, path)
            raw = archive.read(records[_META_RECORD]) if _META_RECORD in records else None
            digests = _pt2_digests(archive, records)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, KeyError) as exc:
        raise ExportError(f"{path}: not a readable torch.export archive ({_one_line(exc)}); {_REEXPORT}") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if raw is None:
        _no_checksum(path, f"no {_META_FILE} (not written by fxwormhole.export)")
        return {"format": "pt2"}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: its {_META_FILE} is not valid JSON ({_one_line(exc)}), so the file is "
                          f"damaged; {_REEXPORT}") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: its {_META_FILE} holds a JSON {type(meta).__name__}, not an object, so the "
                          f"file is damaged; {_REEXPORT}")
    expected = meta.get("sha256")
    if expected is None:
        _no_checksum(path, f"its {_META_FILE} carries no checksum (written by an older fxwormhole)")
        return meta
    if not isinstance(expected, dict):
        raise ExportError(f"{path}: the checksums in its {_META_FILE} are malformed; {_REEXPORT}")
    for name in sorted(set(expected) | set(digests)):
        if expected.get(name) == digests.get(name):
            continue
        if name not in digests:
            why = f"{name} ({_what_record(name)}) is missing"
        elif name not in expected:
            why = f"it holds {name}, which fxwormhole.export did not write"
        else:
            why = f"{name} ({_what_record(name)}) does not match its checksum"
        raise ExportError(f"{path}: {why}: the file was modified or damaged after it was exported; {_REEXPORT}")
    return meta


def _onnx_digests(proto: Any) -> dict[str, str]:
    """SHA-256 of the initializers (weights) and of the rest of the model (program), our own
    metadata entry left out; protobuf serialises the fields of a message deterministically."""
    weights = hashlib.sha256()
    for tensor in sorted(proto.graph.initializer, key=lambda t: t.name):
        weights.update(tensor.SerializeToString(deterministic=True))
    program = type(proto)()
    program.CopyFrom(proto)
    del program.graph.initializer[:]
    kept = [p for p in program.metadata_props if p.key != _ONNX_CHECKSUM_KEY]
    del program.metadata_props[:]
    program.metadata_props.extend(kept)
    return {"weights": weights.hexdigest(),
            "program": hashlib.sha256(program.SerializeToString(deterministic=True)).hexdigest()}


def _onnx_proto(ep: torch.export.ExportedProgram, inputs: tuple) -> Any:
    """The ExportedProgram as an ONNX ModelProto (``while_loop`` -> ``Loop``), errors as ExportError."""
    try:
        onx = torch.onnx.export(ep, inputs, dynamo=True, verbose=False,
                                custom_translation_table=_onnx_translations())
        return onx.model_proto
    except Exception as exc:  # noqa: BLE001 - ConversionError and friends
        raise ExportError(f"ONNX conversion failed{_where(exc)}: {_one_line(exc)}; export format='pt2' instead, "
                          "or replace the op named above by one ONNX supports") from exc


def _write_onnx(proto: Any, tmp: Path) -> None:
    import onnx

    digests = json.dumps(_onnx_digests(proto))
    proto.metadata_props.add(key=_ONNX_CHECKSUM_KEY, value=digests)
    onnx.save_model(proto, str(tmp))


def _verify_onnx(path: Path, data: bytes) -> None:
    try:
        import onnx
    except ImportError:
        _no_checksum(path, "the onnx package is missing (pip install fxwormhole[onnx])")
        return
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ExportError(f"{path}: not a readable ONNX model ({_one_line(exc)}); {_REEXPORT}") from None
    stored = [p.value for p in proto.metadata_props if p.key == _ONNX_CHECKSUM_KEY]
    if not stored:
        _no_checksum(path, "it carries no checksum (not written by fxwormhole.export)")
        return
    try:
        expected = json.loads(stored[-1])
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: its checksum entry is not valid JSON ({_one_line(exc)}); {_REEXPORT}") from None
    for part, digest in _onnx_digests(proto).items():
        if not isinstance(expected, dict) or expected.get(part) != digest:
            what = "the weights (initializers)" if part == "weights" else "the program (graph)"
            raise ExportError(f"{path}: {what} do not match the checksum written at export: the file was "
                              f"modified or damaged after it was exported; {_REEXPORT}")


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

    def __init__(self, path: Path, data: bytes) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running an ONNX export needs onnxruntime: pip install fxwormhole[onnx]") from None
        try:  # from the bytes that were verified, not the file again
            self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{path}: onnxruntime cannot load it ({_one_line(exc)}); re-export it") from None
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Any) -> Any:
        inputs = tuple(t for t in tree_leaves(inputs) if isinstance(t, Tensor))  # ONNX takes the leaves
        if len(inputs) != len(self.names):
            raise ExportError(f"the ONNX model takes {len(self.names)} inputs {self.names}, got {len(inputs)}")
        feed = {n: t.detach().cpu().numpy() for n, t in zip(self.names, inputs)}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def load(path: str | Path) -> ExportedModel:
    """Load a ``.pt2`` or ``.onnx`` file written by :func:`export` as an inference-only module.

    The checksums written at export are verified first; a file without them (written by plain
    ``torch.export.save`` or an older fxwormhole) loads with a warning.

    Raises:
        ExportError: the file is missing, unreadable, or was modified or damaged since it was
            exported (names the file and the record that differs).
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file; write it with fxwormhole.export(model, inputs, path)")
    if path.suffix == ".onnx":
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _unreadable(path, exc) from None
        _verify_onnx(path, data)
        return ExportedModel(_OrtRunner(path, data), path=path, format="onnx", meta={"format": "onnx"})
    meta = _verify_pt2(path)
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise ExportError(f"{path}: not a readable torch.export archive ({_one_line(exc)}); {_REEXPORT}") from None
    return ExportedModel(ep.module(), path=path, format="pt2", meta=meta)


export.load = load  # type: ignore[attr-defined]  # reachable as fxwormhole.export.load
