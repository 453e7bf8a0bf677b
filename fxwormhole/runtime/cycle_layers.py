"""BatchNorm inside a fixed point updates its running statistics once per forward, as in the original model.

A fixed point evaluates its body once per iteration, so a BatchNorm in training mode would update its
running statistics at every evaluation (``k`` updates per forward instead of one, the earlier ones
from iterates far from the fixed point). :class:`CycleBatchNorm` normalises with the batch's
statistics like BatchNorm, but only records them; :func:`commit_batch_norms` (a forward hook on the
fixed-point node) applies the running update once, after the solve, from the last evaluation (the
converged iterate ``y* = body(z*)``). Dropout inside a cycle: :mod:`fxwormhole.runtime.solve_dropout`.

The pass that installs it is :mod:`fxwormhole.passes.cycle_layers`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CycleBatchNorm", "CycleBatchNorm1d", "CycleBatchNorm2d",
           "CycleBatchNorm3d", "commit_batch_norms", "batch_norms_quiet"]


class CycleBatchNorm(_BatchNorm):
    """BatchNorm whose running statistics move once per forward of the fixed point that holds it.

    Training mode: normalises with the current batch's statistics (as BatchNorm does) and records
    them; :meth:`commit` then applies BatchNorm's running update (momentum, or the cumulative
    average when ``momentum=None``) and counts one batch. Eval mode, or ``track_running_stats=False``:
    exactly ``nn.BatchNorm``. Built by :meth:`replacing` a BatchNorm, sharing its parameters and
    buffers (same state-dict keys).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.track_running_stats:
            # the last evaluation's batch statistics; buffers (not in the state dict) so that the
            # compiled path's check sees a training-mode update and asks for eval(), as for BatchNorm
            self.register_buffer("running_mean_pending", torch.zeros_like(self.running_mean), persistent=False)
            self.register_buffer("running_var_pending", torch.ones_like(self.running_var), persistent=False)
        self._has_pending = False
        self.recording = True  # off while extra evaluations run (regularisers, diagnostics)

    @classmethod
    def replacing(cls, bn: _BatchNorm) -> "CycleBatchNorm":
        """A cycle version of ``bn`` (``CycleBatchNorm1d/2d/3d`` for torch's, so ``isinstance(m,
        nn.BatchNorm2d)`` still holds), sharing its parameters and buffers."""
        cls = _CYCLE_CLASSES.get(type(bn), cls)
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        # share, do not copy: the optimizer, state_dict and the user's aliases see the same tensors
        for name, p in bn.named_parameters(recurse=False):
            setattr(new, name, p)
        for name, b in bn.named_buffers(recurse=False):
            new.register_buffer(name, b)
        if new.track_running_stats:
            new.running_mean_pending = new.running_mean_pending.to(bn.running_mean)
            new.running_var_pending = new.running_var_pending.to(bn.running_var)
        new.train(bn.training)
        return new

    def _check_input_dim(self, input: Tensor) -> None:
        """No rank check for other BatchNorm kinds; CycleBatchNorm1d/2d/3d use torch's."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats) or _is_traced():
            # eval mode, or traced for compilation: BatchNorm itself (a traced training-mode update
            # is what the compiled path detects and refuses, asking for eval())
            return super().forward(x)
        self._check_input_dim(x)
        if self.recording and not _is_transformed(x):
            with torch.no_grad():
                dims = [0, *range(2, x.dim())]
                self.running_mean_pending.copy_(x.detach().mean(dims))
                self.running_var_pending.copy_(x.detach().var(dims, unbiased=True))
                self._last_input = x.detach()  # commit() runs BatchNorm's own update on it: bit for bit
                self._has_pending = True
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @torch.no_grad()
    def commit(self) -> None:
        """Apply the recorded batch statistics to the running ones, once (then forget them)."""
        if not self._has_pending or not self.track_running_stats:
            return
        self._has_pending = False
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x, self._last_input = self._last_input, None
        F.batch_norm(x, self.running_mean, self.running_var, None, None, True, factor, self.eps)


class CycleBatchNorm1d(CycleBatchNorm, nn.BatchNorm1d):
    """:class:`CycleBatchNorm` for ``nn.BatchNorm1d``."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class CycleBatchNorm2d(CycleBatchNorm, nn.BatchNorm2d):
    """:class:`CycleBatchNorm` for ``nn.BatchNorm2d``."""

    _check_input_dim = nn.BatchNorm2d._check_input_dim


class CycleBatchNorm3d(CycleBatchNorm, nn.BatchNorm3d):
    """:class:`CycleBatchNorm` for ``nn.BatchNorm3d``."""

    _check_input_dim = nn.BatchNorm3d._check_input_dim


_CYCLE_CLASSES = {nn.BatchNorm1d: CycleBatchNorm1d, nn.BatchNorm2d: CycleBatchNorm2d, nn.BatchNorm3d: CycleBatchNorm3d}


def _is_traced() -> bool:
    """True under torch.compile or make_fx (the compiled fixed point's graph builder)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return torch.compiler.is_compiling() or get_proxy_mode() is not None


def _is_transformed(x: Tensor) -> bool:
    """True under torch.func transforms (jvp, vmap): their tensors must not be stored."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def commit_batch_norms(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook on a fixed-point node: commit every :class:`CycleBatchNorm` of its body once."""
    if module.training:
        for m in module.modules():
            if isinstance(m, CycleBatchNorm):
                m.commit()


@contextlib.contextmanager
def batch_norms_quiet(module: nn.Module) -> Iterator[None]:
    """Extra evaluations of a body (regularisers, monitors) record no BatchNorm statistics."""
    norms = [m for m in module.modules() if isinstance(m, CycleBatchNorm) and m.recording]
    for m in norms:
        m.recording = False
    try:
        yield
    finally:
        for m in norms:
            m.recording = True
