"""Import torchvision's pure-Python model code against a CPU-only torch.

Why: PyPI's torchvision 0.28.0 (the release for torch 2.13) ships a ``_C.so`` linked against
``libc10_cuda.so``/``libtorch_cuda.so``. Against the CPU torch used here (torch 2.13.0+cpu, from the
local index) that library cannot load; torchvision swallows the ``OSError`` and carries on without
its C++ ops, but ``torchvision/_meta_registrations.py`` then calls
``torch.library.register_fake("torchvision::nms")`` (and ``qnms``) unconditionally, which fails with
``RuntimeError: operator torchvision::nms does not exist``, so ``import torchvision`` fails.

What: if (and only if) ``torchvision/_C.so`` cannot be loaded, define the schemas of the two ops
torchvision registers unconditionally, with a kernel that raises. ``import torchvision`` then works;
``torchvision.extension._has_ops()`` stays False, so every other C++ op (roi_align, deform_conv2d,
image decoding, ...) keeps raising torchvision's own "Couldn't load custom C++ ops" error. The
classification models (resnet, mobilenet, vit, ...) use none of these ops.

transformers imports ``torchvision.transforms`` whenever torchvision is installed, so with the
broken wheel *every* transformers model class fails to import too
(``ModuleNotFoundError: Could not import module 'GPT2LMHeadModel'``): :func:`install` must run
before the first ``import transformers``. ``tests/conftest.py`` and ``tests/thirdparty/__init__.py``
call it. Used only by the tests and ``bench/model_coverage.py``; the library never imports it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["install", "import_torchvision", "SHIMMED_OPS", "shim_active"]

#: the ops ``torchvision/_meta_registrations.py`` registers whether or not ``_C.so`` loaded, with
#: their schemas as ``torchvision/csrc/ops/nms.cpp`` defines them.
SHIMMED_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_library: torch.library.Library | None = None  # kept alive: dropping it removes the definitions


def _extension_loads(spec) -> bool:
    path = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
    if not os.path.exists(path):
        return False
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError):
        return False
    return True


def _unavailable(name: str):
    def kernel(*args, **kwargs):
        raise RuntimeError(
            f"torchvision::{name} is unavailable: torchvision's C++ ops did not load against this "
            f"CPU-only torch (tests/thirdparty/torchvision_shim.py only defines its schema)")
    return kernel


def shim_active() -> bool:
    """True when the schemas above were defined by this module (torchvision's ``_C.so`` did not load)."""
    return _library is not None


def install() -> bool:
    """Define the schemas torchvision needs if it is installed and its C++ ops cannot load.

    Cheap (does not import torchvision) and idempotent. Returns :func:`shim_active`.
    """
    global _library
    if _library is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or hasattr(torch.ops.torchvision, "nms"):
        return False  # not installed, or its ops are already registered
    if _extension_loads(spec):
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in SHIMMED_OPS.items():
        lib.define(schema)
        lib.impl(name, _unavailable(name), "CompositeExplicitAutograd")
    _library = lib
    return True


def import_torchvision():
    """``import torchvision`` after :func:`install`."""
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("torchvision is not installed: pip install -e '.[dev]'")
    install()
    import torchvision

    return torchvision
