"""``fxwormhole.save(net, directory)`` / ``fxwormhole.load(directory, model)``: a transformed model
as a folder that a later process rebuilds, for inference or to continue training.

A save is a folder of three files (the layout of ``save_pretrained``)::

    fxwormhole_config.json   what to rebuild: format version, fxwormhole/torch versions, the
                             WormholeConfig and SALConfig, the capture front end, the example
                             inputs' shapes and dtypes, training flags, the parameter order
    model.safetensors        the state_dict (public names: the original module paths, plus the
                             wormholes' gates and projections and the SAL probes' buffers)
    optimizer.pt             only with ``save(..., optimizer=opt)``: ``opt.state_dict()``

The graph is not stored: :func:`load` runs :func:`fxwormhole.transform` again on the model you pass
(built with the same class and arguments) and loads the weights into the result. So a save needs
the model's code, exactly as ``model.load_state_dict`` does, and holds no pickled code.

The files are replaced together (:func:`fxwormhole._atomic.atomic_files`): each is written to a
temporary file first, and none is renamed into place until all are written, so a save that fails
(disk full, no permission, Ctrl-C) leaves an earlier save in the folder as it was, loadable. The
config, renamed last, records the SHA-256 of the others: a process killed during the renames
themselves leaves checksums that do not match, which :func:`load` refuses.

The format is versioned (``format_version``); :func:`load` migrates every older version it knows
(see :data:`MIGRATIONS`) and refuses newer ones with the advice to upgrade.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ._atomic import atomic_files
from ._modules import unwrap
from .config import GradConfig, SALConfig, SolverConfig, WormholeConfig
from .errors import ConfigError, FxWormholeError, LoadError, SaveError
from .transform_record import InputSpec, TransformRecord

__all__ = ["save", "load", "load_optimizer", "TransformRecord", "InputSpec", "FORMAT", "FORMAT_VERSION",
           "CONFIG_FILE", "WEIGHTS_FILE", "OPTIMIZER_FILE", "MIGRATIONS"]

FORMAT = "fxwormhole.transformed"
FORMAT_VERSION = 2
CONFIG_FILE = "fxwormhole_config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
_INSTALL = "pip install fxwormhole[save]"


# ------------------------------------------------------------------------------------------------
# configs <-> JSON
def _config_to_json(config: WormholeConfig) -> dict:
    out = dataclasses.asdict(config)
    if not isinstance(config.wormholes, str):
        out["wormholes"] = [list(pair) for pair in config.wormholes]
    return out


def _config_from_json(data: Mapping[str, Any], where: Path) -> WormholeConfig:
    data = dict(data)
    try:
        data["solver"] = SolverConfig(**data["solver"]) if isinstance(data.get("solver"), dict) else data.get("solver", "anderson")
        data["grad"] = GradConfig(**data["grad"]) if isinstance(data.get("grad"), dict) else data.get("grad", "implicit")
        return WormholeConfig(**data)
    except (TypeError, ConfigError) as exc:
        raise LoadError(f"{where}: its wormhole_config cannot be read by this fxwormhole ({exc}); it was written by "
                        f"another version: load it with that version, or transform the model again") from None


def _sal_from_json(data: Mapping[str, Any] | None, where: Path) -> SALConfig | None:
    if data is None:
        return None
    try:
        return SALConfig(**data)
    except (TypeError, ConfigError) as exc:
        raise LoadError(f"{where}: its sal_config cannot be read by this fxwormhole ({exc}); it was written by "
                        f"another version: load it with that version, or transform the model again") from None


def _input_to_json(spec: InputSpec, index: int) -> dict:
    if spec.shape is not None:
        return {"shape": list(spec.shape), "dtype": spec.dtype}
    try:
        json.dumps(spec.value)
    except (TypeError, ValueError):
        return {"unsupported": type(spec.value).__name__}
    return {"value": spec.value}


def _input_from_json(data: Mapping[str, Any]) -> InputSpec | None:
    if "shape" in data:
        return InputSpec(tuple(data["shape"]), data["dtype"])
    if "value" in data:
        return InputSpec(value=data["value"])
    return None  # a value that JSON cannot hold: load needs example_inputs


# ------------------------------------------------------------------------------------------------
# helpers
def _record_of(net: nn.Module) -> TransformRecord:
    meta = getattr(net, "meta", None)
    record = meta.get("fxwormhole", {}).get("transform") if isinstance(meta, dict) else None
    if not isinstance(record, TransformRecord):
        raise ConfigError(f"fxwormhole.save: a {type(net).__name__} is not a model returned by fxwormhole.transform "
                          "(it carries no record of the transform to repeat at load time); save the result of "
                          "fxwormhole.transform(...), or use torch.save(model.state_dict(), path) for other modules")
    if record.keywords:
        raise ConfigError(f"fxwormhole.save: this model was transformed with keyword inputs ({', '.join(record.keywords)}), "
                          "which fxwormhole.load cannot repeat yet; save its weights with torch.save(net.state_dict(), "
                          "path) and rebuild it with the same fxwormhole.transform call before load_state_dict")
    return record


def _safetensors(action: str):
    try:
        import safetensors.torch as st
    except ImportError:
        raise ConfigError(f"{action} needs the safetensors package; install it with: {_INSTALL}") from None
    return st


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_for_safetensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage: tied weights
    are written once per name and tied again by ``load_state_dict``)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.device.index or 0) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t.to("cpu").contiguous()
    return out


def _full_state(net: nn.Module, optimizer: Any) -> tuple[dict, bool]:
    """``(state_dict with full tensors, whether this process writes)``: FSDP2 shards (DTensors) are
    gathered on every rank, and only rank 0 writes."""
    state = net.state_dict()
    if not any(hasattr(v, "full_tensor") for v in state.values()):
        return state, True
    if optimizer is not None:
        raise ConfigError("fxwormhole.save(optimizer=...): the optimizer state of an FSDP2 model is sharded; save it "
                          "with torch.distributed.checkpoint (get_optimizer_state_dict) and call save without it")
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    import torch.distributed as dist

    return state, not dist.is_initialized() or dist.get_rank() == 0


def _mode_exceptions(net: nn.Module) -> dict[str, bool]:
    """Submodules whose training flag differs from the top module's (e.g. a frozen BatchNorm)."""
    return {name: m.training for name, m in net.named_modules() if name and m.training != net.training}


# ------------------------------------------------------------------------------------------------
# save
def save(net: nn.Module, directory: str | Path, *, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``net`` (a result of :func:`fxwormhole.transform`) to ``directory``; return the folder.

    Saved: every parameter and persistent buffer (``state_dict()``: the model's weights, the
    wormholes' gates and projections, the SAL probes' running statistics), the transform's
    configuration, and the training flags of every module. With ``optimizer`` also
    ``optimizer.state_dict()`` (Adam's moments, step counts, hyper-parameters) to ``optimizer.pt``;
    read it back with :func:`load_optimizer`. Not saved, as with ``torch.save(model.state_dict())``:
    the random number generators' state, learning-rate schedulers, gradient scalers, and the last
    call's fixed-point statistics.

    ``directory`` is created if missing; files of an earlier save there are replaced (each atomically).
    A model wrapped in ``DistributedDataParallel`` or ``torch.compile`` is unwrapped; save from one
    rank only (rank 0). A model sharded with FSDP2 (``fully_shard``) is saved by calling this on
    every rank (its shards are gathered, a collective); rank 0 writes. Its optimizer state is
    sharded too: save it with ``torch.distributed.checkpoint``.

    Raises:
        ConfigError: ``net`` is not a transformed model, or safetensors is missing (``pip install
            fxwormhole[save]``).
        SaveError: a file could not be written (the files already there are unchanged).
    """
    net = unwrap(net)
    record = _record_of(net)
    st = _safetensors("fxwormhole.save")
    state, writer = _full_state(net, optimizer)
    if not writer:
        return Path(directory)
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise SaveError(f"cannot save to {folder}: it is a file, not a folder; pass a folder path (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SaveError(f"cannot create the folder {folder} ({exc.strerror or exc}); check the path and that you may "
                        "write there") from exc
    from . import __version__

    inputs = [_input_to_json(s, i) for i, s in enumerate(record.inputs)]
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fxwormhole_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "model_class": record.model_class,
        "front_end": net.meta["fxwormhole"].get("front_end", "auto"),
        "example_inputs": inputs,
        "wormhole_config": _config_to_json(record.config),
        "sal_config": None if record.sal is None else dataclasses.asdict(record.sal),
        "transform_training": record.training,
        "training": net.training,
        "training_exceptions": _mode_exceptions(net),
        "parameters": [name for name, _ in net.named_parameters()],
        "summary": net.summary() if hasattr(net, "summary") else "",
    }
    with atomic_files() as files:  # nothing replaced until every file is written: an earlier save survives a failure
        with files.stage(folder / WEIGHTS_FILE, what="the weights") as tmp:
            mode = stat.S_IMODE(tmp.stat().st_mode)  # safetensors re-creates the file as 0o600
            st.save_file(_weights_for_safetensors(state), str(tmp), metadata={"format": FORMAT})
            os.chmod(tmp, mode)
            config["weights"] = {"file": WEIGHTS_FILE, "sha256": _sha256(tmp)}
        config["optimizer"] = None
        if optimizer is not None:
            state = optimizer.state_dict()
            with files.stage(folder / OPTIMIZER_FILE, what="the optimizer state") as tmp:
                torch.save(state, tmp)
                config["optimizer"] = {"file": OPTIMIZER_FILE, "class": type(optimizer).__name__,
                                       "sha256": _sha256(tmp),
                                       "parameters_per_group": [len(g["params"]) for g in state["param_groups"]]}
        with files.stage(folder / CONFIG_FILE, what="the model configuration") as tmp:  # last: it vouches for the rest
            tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------
# load
def _migrate_1_to_2(config: dict) -> dict:
    """Format 1 (fxwormhole 0.1.0 before the parameter order and training flags were kept) recorded
    ``input_shapes`` (all float32) and ``training``; format 2 records dtypes, both training flags and
    the parameter order."""
    config = dict(config)
    config["example_inputs"] = [{"shape": list(s), "dtype": "float32"} for s in config.pop("input_shapes")]
    config.setdefault("transform_training", config.get("training", True))
    config.setdefault("training_exceptions", {})
    config.setdefault("parameters", None)  # unknown: the optimizer check then relies on the state_dict
    config.setdefault("optimizer", None)
    config["format_version"] = 2
    return config


#: ``format_version -> function`` turning a config of that version into one of the next version
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _migrate_1_to_2}


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise LoadError(f"cannot load from {folder}: "
                        f"{'it is a file, not a folder' if folder.exists() else 'no such folder'}; pass the folder "
                        "that fxwormhole.save(net, folder) wrote")
    if not path.is_file():
        raise LoadError(f"{folder} holds no {CONFIG_FILE}, so it is not a folder written by fxwormhole.save (or the save "
                        "was interrupted before it finished); save the model again")
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise LoadError(f"cannot read {path} ({exc.strerror or exc}); check that the file is readable") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path} is damaged: not valid JSON ({exc}); save the model again or restore the folder "
                        "from a copy") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise LoadError(f"{path} is not an fxwormhole save (its 'format' is not {FORMAT!r}); pass the folder that "
                        "fxwormhole.save wrote")
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise LoadError(f"{path}: format_version {version!r} is invalid; save the model again")
    if version > FORMAT_VERSION:
        raise LoadError(f"{path} was written by fxwormhole {config.get('fxwormhole_version', '?')} in format "
                        f"{version}; this fxwormhole reads formats up to {FORMAT_VERSION}: upgrade fxwormhole")
    while config["format_version"] < FORMAT_VERSION:
        config = MIGRATIONS[config["format_version"]](config)
    return config


def _checked_file(folder: Path, entry: Mapping[str, Any], what: str) -> Path:
    path = folder / entry["file"]
    if not path.is_file():
        raise LoadError(f"{path} ({what}) is missing; {folder / CONFIG_FILE} expects it: copy the whole folder, "
                        "or save the model again")
    expected = entry.get("sha256")
    if expected is not None and _sha256(path) != expected:
        raise LoadError(f"{path} ({what}) does not match the checksum in {CONFIG_FILE}: the file is damaged, was "
                        "replaced, or a save was interrupted; save the model again or restore the folder from a copy")
    return path


@contextlib.contextmanager
def _training_flags(model: nn.Module, mode: bool):
    """``model.train(mode)`` for the duration, every submodule's own flag restored afterwards."""
    before = {m: m.training for m in model.modules()}
    model.train(mode)
    try:
        yield model
    finally:
        for m, flag in before.items():
            m.training = flag


def _example_inputs(config: dict, given: Any, path: Path) -> tuple:
    if given is not None:
        return (given,) if isinstance(given, torch.Tensor) else tuple(given)
    specs = [_input_from_json(d) for d in config["example_inputs"]]
    if any(s is None for s in specs):
        raise LoadError(f"{path} records an example input that is not a tensor or a plain value; pass "
                        "example_inputs=... (as given to fxwormhole.transform) to fxwormhole.load")
    generator = torch.Generator().manual_seed(0)
    return tuple(s.example(generator) for s in specs)


def _mismatch(path: Path, config: dict, model: nn.Module, detail: str) -> LoadError:
    return LoadError(f"{path} was saved from a {config.get('model_class', '?')} whose transformed parameters differ "
                     f"from those of the {type(model).__name__} passed to load ({detail}); pass a model built with "
                     "the same class and constructor arguments as the saved one")


def load(directory: str | Path, model: nn.Module, *, example_inputs: Any = None) -> nn.Module:
    """Rebuild the transformed model saved in ``directory`` from ``model``; return it.

    ``model`` is the *original* (untransformed) module, built with the same class and constructor
    arguments as the one that was transformed; its weights do not matter, and it is not modified.
    The transform is repeated with the saved configuration, then the saved weights and buffers are
    loaded. The result is in the training mode it was saved in; its ``parameters()`` come in the
    same order as at save time, so ``optimizer.load_state_dict`` (:func:`load_optimizer`) fits.
    Continuing to train it computes bit for bit what the saved model would have computed.
    Tensors land on the device of ``model``'s parameters. The global random number generator is
    not touched.

    Args:
        directory: a folder written by :func:`save`.
        model: the original model, e.g. ``zoo.MLP(hidden=32)``.
        example_inputs: only when the save recorded an example input that JSON cannot hold.

    Raises:
        LoadError: the folder is not a save, a file is missing or damaged (the message names it), or
            ``model`` does not rebuild the saved structure.
        ConfigError: safetensors is missing (``pip install fxwormhole[save]``).
    """
    from .api import transform

    folder = Path(directory)
    config = _read_config(folder)
    path = folder / CONFIG_FILE
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fxwormhole.load(directory, model): model must be the original nn.Module (e.g. built as "
                          f"the saved {config.get('model_class', 'model')}), got {type(model).__name__}")
    st = _safetensors("fxwormhole.load")
    weights_path = _checked_file(folder, config["weights"], "the weights")
    wormholes = _config_from_json(config["wormhole_config"], path)
    sal = _sal_from_json(config.get("sal_config"), path)
    inputs = _example_inputs(config, example_inputs, path)
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    # transform draws the wormholes' initial weights from the global generator; they are overwritten
    # by the saved ones, and a resumed run must see the generator as it was
    with torch.random.fork_rng(devices=[]), _training_flags(model, config["transform_training"]):
        try:
            net = transform(model, inputs, wormholes, sal=sal, front_end=config.get("front_end", "auto"))
        except FxWormholeError as exc:
            raise LoadError(f"rebuilding the model saved in {folder} failed: {exc}") from exc
    names = [name for name, _ in net.named_parameters()]
    if config.get("parameters") is not None and names != config["parameters"]:
        missing = [n for n in config["parameters"] if n not in names][:3]
        extra = [n for n in names if n not in config["parameters"]][:3]
        detail = (f"missing {missing}, unexpected {extra}" if missing or extra else "the same names in another order")
        raise _mismatch(path, config, model, detail)
    try:
        state = st.load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - safetensors reports damage as SafetensorError / OSError
        raise LoadError(f"{weights_path} is damaged: safetensors cannot read it ({' '.join(str(exc).split())[:160]}); "
                        "save the model again or restore the folder from a copy") from None
    try:
        result = net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise _mismatch(weights_path, config, model, first) from None
    del result
    net.train(config.get("training", True))
    modules = dict(net.named_modules())
    for name, flag in (config.get("training_exceptions") or {}).items():
        if name in modules:
            modules[name].training = flag
    return net


def load_optimizer(directory: str | Path, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Load the optimizer state that ``save(net, directory, optimizer=...)`` wrote into ``optimizer``
    (built on the parameters of the model :func:`load` returned, as before the save); return it.

    Raises:
        LoadError: the save holds no optimizer state, the file is missing or damaged, or
            ``optimizer`` has another class or other parameter groups than the saved one.
    """
    folder = Path(directory)
    config = _read_config(folder)
    entry = config.get("optimizer")
    if not entry:
        raise LoadError(f"{folder / CONFIG_FILE} holds no optimizer state; save with "
                        "fxwormhole.save(net, folder, optimizer=opt) to keep it")
    path = _checked_file(folder, entry, "the optimizer state")
    if entry.get("class") != type(optimizer).__name__:
        raise LoadError(f"{path} holds the state of a {entry.get('class')}, not of a {type(optimizer).__name__}; "
                        f"build a {entry.get('class')} on the loaded model's parameters")
    groups = [len(g["params"]) for g in optimizer.param_groups]
    if entry.get("parameters_per_group") not in (None, groups):
        raise LoadError(f"{path} holds parameter groups of sizes {entry['parameters_per_group']}, the optimizer has "
                        f"{groups}; build it on the loaded model's parameters() as before the save")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch reports damage in several ways
        raise LoadError(f"{path} is damaged ({type(exc).__name__}); save again or restore a copy") from None
    optimizer.load_state_dict(state)
    return optimizer
