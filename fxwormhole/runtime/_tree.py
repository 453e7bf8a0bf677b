"""Flat views of tensor-or-tuple states, input slicing, and the per-sample residual."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError

Tree = Any  # a Tensor or a tuple/list of Tensors


@dataclass(frozen=True)
class Spec:
    """How a tensor or tuple of tensors with batch dim 0 maps to a flat ``[B, D]`` tensor."""

    shapes: Tuple[Tuple[int, ...], ...]  # per component, without the batch dim
    dtypes: Tuple[torch.dtype, ...]
    is_tuple: bool
    dtype: torch.dtype  # common dtype of the flat tensor

    @property
    def sizes(self) -> Tuple[int, ...]:
        out = []
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            out.append(n)
        return tuple(out)


def leaves(tree: Tree) -> Tuple[Tensor, ...]:
    return tuple(tree) if isinstance(tree, (tuple, list)) else (tree,)


def spec_of(tree: Tree, what: str = "state") -> Spec:
    parts = leaves(tree)
    if not parts or not all(isinstance(t, Tensor) for t in parts):
        raise ConfigError(f"the fixed-point {what} must be a tensor or a tuple of tensors, got {type(tree).__name__}")
    for t in parts:
        if t.dim() == 0:
            raise ConfigError(f"the fixed-point {what} has a 0-d component; every component needs batch dim 0")
    dtype = parts[0].dtype
    for t in parts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return Spec(tuple(tuple(t.shape[1:]) for t in parts), tuple(t.dtype for t in parts),
                isinstance(tree, (tuple, list)), dtype)


def flatten(tree: Tree, spec: Spec) -> Tensor:
    parts = leaves(tree)
    if len(parts) == 1:  # hot path: a view, no dtype conversion call when none is needed
        t = parts[0]
        t = t.reshape(t.shape[0], -1) if t.dim() != 2 else t
        return t if t.dtype == spec.dtype else t.to(spec.dtype)
    return torch.cat([t.reshape(t.shape[0], -1).to(spec.dtype) for t in parts], dim=1)


def unflatten(flat: Tensor, spec: Spec) -> Tree:
    b = flat.shape[0]
    if len(spec.shapes) == 1:
        out = flat if len(spec.shapes[0]) == 1 else flat.reshape((b,) + spec.shapes[0])
        out = out if out.dtype == spec.dtypes[0] else out.to(spec.dtypes[0])
        return (out,) if spec.is_tuple else out
    chunks = torch.split(flat, spec.sizes, dim=1)
    out = tuple(c.reshape((b,) + s).to(dt) for c, s, dt in zip(chunks, spec.shapes, spec.dtypes))
    return out


def batch_size(tree: Tree) -> int:
    return leaves(tree)[0].shape[0]


def batched_mask(inputs: Sequence[Any], batch: int, batched: Optional[Sequence[bool]]) -> Tuple[bool, ...]:
    """Which inputs carry the batch dim (explicit ``batched`` or ``shape[0] == batch``)."""
    if batched is not None:
        if len(batched) != len(inputs):
            raise ConfigError(
                f"batched={list(batched)} has {len(batched)} entries but the node got {len(inputs)} inputs; "
                "give one bool per positional input")
        return tuple(bool(b) for b in batched)
    return tuple(isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch for x in inputs)


def take_rows(inputs: Sequence[Any], batched: Sequence[bool], rows: Optional[Tensor]) -> Tuple[Any, ...]:
    if rows is None:
        return tuple(inputs)
    return tuple(x.index_select(0, rows) if b else x for x, b in zip(inputs, batched))


def residual(z: Tensor, fz: Tensor, scale: Optional[Tensor], eps: float = 1e-12) -> Tensor:
    """Per-sample ``||fz - z|| / (||fz|| + scale + eps)``, at least in float32."""
    if z.dtype in (torch.float32, torch.float64):  # the hot path: no dtype argument, fewer ops
        diff = torch.linalg.vector_norm(fz - z, dim=1)
        ref = torch.linalg.vector_norm(fz, dim=1)
    else:
        diff = torch.linalg.vector_norm(fz - z, dim=1, dtype=torch.float32)
        ref = torch.linalg.vector_norm(fz, dim=1, dtype=torch.float32)
    if scale is not None:
        ref = ref + scale.to(ref.dtype)
    return diff.div_(ref.add_(eps))
