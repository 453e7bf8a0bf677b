"""The layout of torch's recurrent modules, in one table.

Rows of ``weight_ih`` / ``weight_hh`` / the biases come in gate blocks of ``hidden_size`` rows each;
the table gives each block's name and its activation, and the state a step carries. The explicit
recurrent modules, the decompose pass, the sensitivity passes and the probes read it from here.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RecurrentLayout", "RECURRENT_LAYOUTS", "layout_of_kind"]


@dataclass(frozen=True)
class RecurrentLayout:
    """One recurrent mode: gate blocks in row order, their activations, the state of a step."""

    mode: str  # torch's ``RNNBase.mode``
    kind: str  # the layer kind of fxwormhole.analysis.layer_kind ("lstm", "gru", "rnn")
    gates: tuple[str, ...]
    activations: tuple[str, ...]
    state: tuple[str, ...]


RECURRENT_LAYOUTS: dict[str, RecurrentLayout] = {
    # input, forget, cell candidate, output
    "LSTM": RecurrentLayout("LSTM", "lstm", ("i", "f", "g", "o"), ("sigmoid", "sigmoid", "tanh", "sigmoid"), ("h", "c")),
    # reset, update, new (candidate)
    "GRU": RecurrentLayout("GRU", "gru", ("r", "z", "n"), ("sigmoid", "sigmoid", "tanh"), ("h",)),
    "RNN_TANH": RecurrentLayout("RNN_TANH", "rnn", ("h",), ("tanh",), ("h",)),
    "RNN_RELU": RecurrentLayout("RNN_RELU", "rnn", ("h",), ("relu",), ("h",)),
}


def layout_of_kind(kind: str, nonlinearity: str = "tanh") -> RecurrentLayout:
    """The layout of a layer kind (``"lstm"``, ``"gru_cell"``, ``"rnn"``, ...); Elman RNNs need their
    ``nonlinearity``."""
    base = kind[:-5] if kind.endswith("_cell") else kind
    if base == "rnn":
        return RECURRENT_LAYOUTS["RNN_RELU" if nonlinearity == "relu" else "RNN_TANH"]
    return next(layout for layout in RECURRENT_LAYOUTS.values() if layout.kind == base)
