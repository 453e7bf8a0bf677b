"""Parsing what a person types: ``MODEL`` specs, ``--kwargs`` JSON, ``--input`` tensor specs, and the
argparse types of counts and output folders."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

from ..errors import ConfigError

__all__ = ["load_model", "parse_input_spec", "parse_kwargs", "positive_int", "output_dir", "DTYPES"]

# torch is imported when a spec is parsed, not when a parser is built (``--help`` stays fast)

#: the dtype names ``--input`` accepts -> the torch dtype's name
DTYPES: dict[str, str] = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}

_MODEL_FORMS = "'path/to/file.py:Name' or 'package.module:Name' (a class or a factory returning an nn.Module)"
_INPUT_FORMS = ("'[DTYPE:]DIMS[:HIGH]', e.g. '4x8', 'float64:2x3x32x32' or 'int64:8x20:100' "
                f"(DTYPE one of {', '.join(DTYPES)}; integer tensors are drawn from [0, HIGH), HIGH=2 by default)")


def parse_kwargs(kwargs_json: str | None) -> dict:
    """``--kwargs`` JSON -> dict (an object is required)."""
    if kwargs_json is None or not kwargs_json.strip():
        return {}
    try:
        value = json.loads(kwargs_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--kwargs {kwargs_json!r} is not valid JSON ({exc.msg} at char {exc.pos}): expected an object such as '{{\"hidden\": 32}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--kwargs {kwargs_json!r} is a JSON {type(value).__name__}: expected an object such as '{{\"hidden\": 32}}'")
    return value


def _import_target(spec: str):
    where, _, name = spec.rpartition(":")
    if not where or not name or not name.isidentifier():
        raise ConfigError(f"model {spec!r}: expected {_MODEL_FORMS}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"model {spec!r}: file {where!r} does not exist; expected {_MODEL_FORMS}")
        mod_name = "_fxwormhole_user_" + re.sub(r"\W", "_", str(path.resolve()))
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise ConfigError(f"model {spec!r}: importing {where} failed with {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise ConfigError(f"model {spec!r}: cannot import module {where!r} ({type(exc).__name__}: {exc}); expected {_MODEL_FORMS}") from None
    if not hasattr(module, name):
        from torch import nn

        found = sorted(k for k, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, nn.Module) and getattr(v, "__module__", "") == module.__name__)
        hint = f"; nn.Module classes there: {', '.join(found)}" if found else ""
        raise ConfigError(f"model {spec!r}: {where} has no attribute {name!r}{hint}")
    return getattr(module, name)


def load_model(spec: str, kwargs_json: str | None = None):
    """Build the model named by ``spec`` with the keyword arguments in ``kwargs_json``.

    ``spec`` is ``path/to/file.py:Name`` or ``package.module:Name``; ``Name`` is an ``nn.Module``
    class or a function returning one. Any failure raises ConfigError saying what was expected.
    """
    from torch import nn

    kwargs = parse_kwargs(kwargs_json)
    target = _import_target(spec)
    if not callable(target):
        raise ConfigError(f"model {spec!r} is a {type(target).__name__}, not a class or factory; expected {_MODEL_FORMS}")
    try:
        model = target(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {spec!r} could not be built with --kwargs {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def parse_input_spec(spec: str):
    """``"[DTYPE:]DIMS[:HIGH]"`` -> a tensor: float ``randn``, integers ``randint(0, HIGH)``, bool coin flips."""
    import torch

    parts = spec.strip().split(":")
    dtype = torch.float32
    if parts and parts[0].lower() in DTYPES:
        dtype = getattr(torch, DTYPES[parts.pop(0).lower()])
    if len(parts) not in (1, 2) or not re.fullmatch(r"\d+(x\d+)*", parts[0]):
        raise ConfigError(f"--input {spec!r}: expected {_INPUT_FORMS}")
    shape = tuple(int(d) for d in parts[0].split("x"))
    if any(d == 0 for d in shape):
        raise ConfigError(f"--input {spec!r}: every dimension must be >= 1; expected {_INPUT_FORMS}")
    high = 2
    if len(parts) == 2:
        if dtype.is_floating_point or dtype == torch.bool or not parts[1].isdigit() or int(parts[1]) < 1:
            raise ConfigError(f"--input {spec!r}: HIGH is an integer >= 1 for integer dtypes only; expected {_INPUT_FORMS}")
        high = int(parts[1])
    _check_fits_in_memory(spec, shape, dtype)
    try:
        if dtype.is_floating_point:
            return torch.randn(shape, dtype=dtype)
        if dtype == torch.bool:
            return torch.randint(0, 2, shape).bool()
        return torch.randint(0, high, shape, dtype=dtype)
    except (RuntimeError, MemoryError) as exc:  # the allocator refused
        raise ConfigError(f"--input {spec!r}: allocating it failed ({' '.join(str(exc).split())[:160]}); "
                          f"{_SMALLER}") from None


_SMALLER = "use a smaller example input (a batch of 2 to 8 samples is enough to trace a model)"


def _human_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def available_memory() -> int | None:
    """Bytes of memory this machine can still hand out (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits_in_memory(spec: str, shape: tuple[int, ...], dtype) -> None:
    """Refuse before allocating: with memory overcommit a too-large tensor is not refused by the
    allocator but killed by the kernel once its pages are written."""
    nbytes = math.prod(shape) * dtype.itemsize
    free = available_memory()
    if free is not None and nbytes > free:
        raise ConfigError(f"--input {spec!r}: this tensor needs {_human_bytes(nbytes)}, more than the "
                          f"{_human_bytes(free)} of memory available; {_SMALLER}")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (``--every 0`` is refused, not read as 'unset')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def output_dir(text: str) -> str:
    """argparse type: a folder to write into; it may not exist yet, but may not be a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file, not a folder: pass a folder path "
                                         "(it is created if missing)")
    return text
