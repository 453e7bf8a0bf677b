"""A user's Python loop over recurrent cells, as one explicit recurrent module.

:class:`CellLoop` is what :class:`~fxwormhole.passes.cell_loops.FuseCellLoops` puts in place of an
unrolled chain of ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` calls (one cell per layer, the
state threaded from step to step). It is an :class:`~fxwormhole.runtime.recurrent.ExplicitRecurrent`
whose weights are not its own: the cells keep their parameters at their module paths (so
``state_dict`` names do not change and the graph shows the parameters it reads), and the graph
passes them to every call as ``get_attr`` values, per layer ``(w_ih, w_hh, b_ih, b_hh)`` in the
cells' layout. Everything else -- the fast temporal runtime, the per-step ``FixedPoint`` fallback,
``stats``, ``compile_step`` -- is the explicit module's.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .recurrent import ExplicitRecurrent

__all__ = ["CellLoop", "CELL_MODES", "cell_mode", "stack_states"]

#: the cells a loop may be made of, and the recurrent mode of each
CELL_MODES = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU", nn.RNNCell: "RNN"}


def cell_mode(module: nn.Module) -> Optional[str]:
    """``LSTM`` / ``GRU`` / ``RNN_TANH`` / ``RNN_RELU`` for a torch cell whose ``forward`` is torch's, else None."""
    for cls, mode in CELL_MODES.items():
        if type(module) is cls or (isinstance(module, cls) and type(module).forward is cls.forward):
            if mode == "RNN":
                return "RNN_RELU" if module.nonlinearity == "relu" else "RNN_TANH"
            return mode
    return None


def stack_states(*states: Tensor) -> Tensor:
    """``[L, B, H]`` from the layers' initial states (the graph node a fused loop's ``hx`` comes from)."""
    return torch.stack(states)


class CellLoop(ExplicitRecurrent):
    """``L`` cells run over ``T`` steps, layer ``l+1`` fed by layer ``l``'s new ``h`` at the same step.

    Args:
        mode: ``LSTM``, ``GRU``, ``RNN_TANH`` or ``RNN_RELU``.
        input_size, hidden_size: of the bottom cell; every cell has ``hidden_size``.
        cells: the cells' module paths, bottom first (for reports and wormhole names).
        biases: per cell, whether it has biases.

    ``forward(x, hx, *weights)``: ``x`` is time-major ``[T, B, input_size]``; ``hx`` is None, ``h0``
    ``[L, B, H]`` or ``(h0, c0)`` (LSTM); ``weights`` are per cell ``w_ih, w_hh`` and, when it has
    biases, ``b_ih, b_hh``. Returns ``(out [T, B, H], h_n)`` or ``(out, (h_n, c_n))``, like
    ``nn.LSTM``.
    """

    _owns_weights = False

    def __init__(self, mode: str, input_size: int, hidden_size: int, cells: Sequence[str], biases: Sequence[bool],
                 device: Any = None, dtype: Any = None) -> None:
        if len(cells) != len(biases) or not cells:
            raise ConfigError(f"CellLoop: cells={list(cells)!r} and biases={list(biases)!r} must be non-empty and as long")
        super().__init__(mode, input_size, hidden_size, len(cells), all(biases), device=device, dtype=dtype)
        self.cells, self.biases = tuple(cells), tuple(bool(b) for b in biases)
        self._call_weights: Optional[List[Tuple[Optional[Tensor], ...]]] = None
        layout: List[Tuple[Optional[int], ...]] = []
        i = 0
        for b in self.biases:
            layout.append((i, i + 1, i + 2, i + 3, None) if b else (i, i + 1, None, None, None))
            i += 4 if b else 2
        self._layout, self._n_weights = layout, i

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cells={list(self.cells)}"

    def weights(self, layer: int, direction: int = 0) -> Tuple[Optional[Tensor], ...]:
        """``(w_ih, w_hh, b_ih, b_hh, None)`` of one cell, from the call in progress."""
        if self._call_weights is None:
            raise ConfigError(f"CellLoop {list(self.cells)}: the cells' weights exist only during a call "
                              "(they are forward arguments)")
        return self._call_weights[layer]

    def _step_inputs(self) -> Tuple[Tensor, ...]:
        return tuple(w for layer in self._call_weights or () for w in layer if w is not None)

    def _step_weight_layout(self) -> Optional[List[Tuple[Optional[int], ...]]]:
        return self._layout

    def forward(self, input: Tensor, hx: Any = None, *weights: Tensor) -> Tuple[Tensor, Any]:  # type: ignore[override]
        if len(weights) != self._n_weights:
            raise ConfigError(f"CellLoop {list(self.cells)}: expected {self._n_weights} weight tensors "
                              f"(w_ih, w_hh[, b_ih, b_hh] per cell), got {len(weights)}")
        self._call_weights = [tuple(None if i is None else weights[i] for i in layer) for layer in self._layout]
        try:
            return super().forward(input, hx)
        finally:
            self._call_weights = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_call_weights"] = None
        return state
