"""What :func:`fxwormhole.transform` records on its result (``gm.meta["fxwormhole"]["transform"]``):
its arguments, so that :func:`fxwormhole.save` can write them and :func:`fxwormhole.load` can repeat
the call. A module of its own so that the front door and persistence both import it, not each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .config import SALConfig, WormholeConfig
from .errors import LoadError

__all__ = ["InputSpec", "TransformRecord"]


@dataclass(frozen=True)
class InputSpec:
    """One positional example input: a tensor's shape and dtype, or a plain value (``None``, a number,
    a string) that the capture specialised."""

    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    value: Any = None

    @classmethod
    def of(cls, x: Any) -> "InputSpec":
        if isinstance(x, torch.Tensor):
            return cls(tuple(int(s) for s in x.shape), str(x.dtype).removeprefix("torch."))
        return cls(value=x)

    def example(self, generator: torch.Generator) -> Any:
        """A value of this spec: floats ``randn``, integers in ``[0, 2)``, booleans coin flips.

        Random, not zeros: the transform checks whether a body couples samples (BatchNorm in
        training mode) by comparing samples, which identical samples would hide.
        """
        if self.shape is None:
            return self.value
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise LoadError(f"example input dtype {self.dtype!r} is not a torch dtype")
        if dtype.is_floating_point or dtype.is_complex:
            return torch.randn(self.shape, generator=generator).to(dtype)
        if dtype == torch.bool:
            return torch.randint(0, 2, self.shape, generator=generator).bool()
        return torch.randint(0, 2, self.shape, generator=generator).to(dtype)


@dataclass(frozen=True)
class TransformRecord:
    """The arguments of a :func:`fxwormhole.transform` call, kept on its result so that
    :func:`save` can write them and :func:`load` can repeat the call."""

    config: WormholeConfig
    sal: SALConfig | None
    inputs: tuple[InputSpec, ...]
    model_class: str
    training: bool

    @classmethod
    def of(cls, model: nn.Module, inputs: Sequence[Any], config: WormholeConfig, sal: SALConfig | None) -> "TransformRecord":
        kind = type(model)
        return cls(config, sal, tuple(InputSpec.of(x) for x in inputs), f"{kind.__module__}.{kind.__qualname__}",
                   bool(model.training))
