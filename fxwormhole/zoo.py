"""Small bundled models: the shapes of network the toolkit is built for.

Used by the tests, the CLI (``fxwormhole inspect fxwormhole.zoo:CNN --input 2x1x12x12``) and the
demo. Every constructor is keyword-only with small defaults; every model has
``example_inputs(batch=4)`` returning the positional arguments of one call, and
:func:`example_inputs` does the same by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLP", "CNN", "ResidualBlock", "ResidualMLP", "TransformerStack",
    "LSTMClassifier", "GRUClassifier", "RNNClassifier", "GRUCellLoop", "SeqLenLoop",
    "TwoInTwoOut", "DataDependentBreak", "ZOO", "build", "example_inputs",
]

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu}


class MLP(nn.Module):
    """``depth`` hidden ``nn.Linear`` layers with a functional activation, then a linear head.

    Layers: ``layers.0`` ... ``layers.{depth-1}``, ``head``. Input ``[B, in_features]``.
    """

    def __init__(self, *, in_features: int = 8, hidden: int = 16, out_features: int = 4, depth: int = 3,
                 activation: str = "tanh") -> None:
        super().__init__()
        self.in_features, self.activation = in_features, activation
        dims = [in_features] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        for layer in self.layers:
            x = act(layer(x))
        return self.head(x)

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.in_features),)


class CNN(nn.Module):
    """conv -> ReLU -> max-pool, twice, then flatten -> linear -> ReLU -> linear head.

    Layers: ``conv1``, ``conv2``, ``fc``, ``head``. Input ``[B, in_channels, size, size]``
    (``size`` divisible by 4).
    """

    def __init__(self, *, in_channels: int = 1, channels: int = 8, size: int = 12, hidden: int = 32,
                 classes: int = 4) -> None:
        super().__init__()
        self.in_channels, self.size = in_channels, size
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.act1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * (size // 4) ** 2, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        return self.head(F.relu(self.fc(self.flatten(x))))

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.in_channels, self.size, self.size),)


class ResidualBlock(nn.Module):
    """``x + linear2(relu(linear1(x)))``: the linear layers sit on the residual branch."""

    def __init__(self, *, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear2(torch.relu(self.linear1(x)))

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.dim),)


class ResidualMLP(nn.Module):
    """``stem`` (linear + tanh) -> ``blocks`` residual blocks -> ``head``. Input ``[B, in_features]``."""

    def __init__(self, *, in_features: int = 8, dim: int = 16, hidden: int = 32, blocks: int = 2,
                 out_features: int = 4) -> None:
        super().__init__()
        self.in_features = in_features
        self.stem = nn.Linear(in_features, dim)
        self.blocks = nn.ModuleList(ResidualBlock(dim=dim, hidden=hidden) for _ in range(blocks))
        self.head = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.in_features),)


class TransformerStack(nn.Module):
    """``layers`` ``nn.TransformerEncoderLayer`` (post-norm, batch_first) then a linear head on the mean.

    The encoder layers branch internally (attention and feed-forward on residual branches); their
    outputs are on the main path. Input ``[B, seq, d_model]``; dropout is 0 so outputs are
    deterministic.
    """

    def __init__(self, *, d_model: int = 16, nhead: int = 2, dim_feedforward: int = 32, layers: int = 2,
                 seq: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.d_model, self.seq = d_model, seq
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=1))

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.seq, self.d_model),)


class _RecurrentClassifier(nn.Module):
    rnn_cls: type[nn.RNNBase] = nn.LSTM

    def __init__(self, *, in_features: int = 6, hidden: int = 12, num_layers: int = 1, seq: int = 5,
                 classes: int = 3) -> None:
        super().__init__()
        self.in_features, self.seq = in_features, seq
        self.proj = nn.Linear(in_features, hidden)
        self.rnn = self.rnn_cls(hidden, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(torch.tanh(self.proj(x)))
        return self.head(out[:, -1])

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.seq, self.in_features),)


class LSTMClassifier(_RecurrentClassifier):
    """``proj`` (linear + tanh) -> ``rnn`` (nn.LSTM, batch_first) -> ``head`` on the last step.

    Input ``[B, seq, in_features]``.
    """

    rnn_cls = nn.LSTM


class GRUClassifier(_RecurrentClassifier):
    """As :class:`LSTMClassifier` with an ``nn.GRU``."""

    rnn_cls = nn.GRU


class RNNClassifier(_RecurrentClassifier):
    """As :class:`LSTMClassifier` with an ``nn.RNN`` (tanh)."""

    rnn_cls = nn.RNN


class GRUCellLoop(nn.Module):
    """A Python loop over an ``nn.GRUCell`` for a fixed ``steps``, then a linear head.

    symbolic_trace unrolls the loop: ``cell`` is called ``steps`` times (weight sharing).
    Input ``[B, steps, in_features]``.
    """

    def __init__(self, *, in_features: int = 6, hidden: int = 12, steps: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.in_features, self.hidden, self.steps = in_features, hidden, steps
        self.cell = nn.GRUCell(in_features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(self.steps):
            h = self.cell(x[:, t], h)
        return self.head(h)

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.steps, self.in_features),)


class SeqLenLoop(GRUCellLoop):
    """Like :class:`GRUCellLoop` but loops over ``x.shape[1]``.

    symbolic_trace cannot (``range(Proxy)``); torch.export unrolls the loop for the example length.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


class TwoInTwoOut(nn.Module):
    """Two encoders (one per input) -> concat -> shared trunk -> two heads; returns ``(y1, y2)``.

    Inputs ``[B, in_a]`` and ``[B, in_b]``.
    """

    def __init__(self, *, in_a: int = 6, in_b: int = 5, hidden: int = 16, out_a: int = 3, out_b: int = 2) -> None:
        super().__init__()
        self.in_a, self.in_b = in_a, in_b
        self.enc_a = nn.Linear(in_a, hidden)
        self.enc_b = nn.Linear(in_b, hidden)
        self.trunk1 = nn.Linear(2 * hidden, hidden)
        self.trunk2 = nn.Linear(hidden, hidden)
        self.head_a = nn.Linear(hidden, out_a)
        self.head_b = nn.Linear(hidden, out_b)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([torch.tanh(self.enc_a(a)), torch.tanh(self.enc_b(b))], dim=-1)
        h = torch.sigmoid(self.trunk2(torch.sigmoid(self.trunk1(h))))
        return self.head_a(h), self.head_b(h)

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(batch, self.in_a), torch.randn(batch, self.in_b))


class DataDependentBreak(GRUCellLoop):
    """Stops the loop when the state is small: ``if h.norm() < 1e-3: break``.

    Branching on a tensor value defeats every front end; :func:`fxwormhole.capture` raises
    ``CaptureError``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(self.steps):
            h = self.cell(x[:, t], h)
            if h.norm() < 1e-3:
                break
        return self.head(h)


ZOO: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in (
    MLP, CNN, ResidualBlock, ResidualMLP, TransformerStack, LSTMClassifier, GRUClassifier,
    RNNClassifier, GRUCellLoop, SeqLenLoop, TwoInTwoOut, DataDependentBreak,
)}


def build(name: str, **kwargs) -> nn.Module:
    """Instantiate the zoo model ``name`` (a key of :data:`ZOO`) with keyword arguments."""
    from .errors import ConfigError

    if name not in ZOO:
        raise ConfigError(f"unknown zoo model {name!r}: expected one of {sorted(ZOO)}")
    return ZOO[name](**kwargs)


def example_inputs(model: str | nn.Module, batch: int = 4) -> tuple[torch.Tensor, ...]:
    """Example positional inputs for a zoo model (an instance, or a name built with defaults)."""
    model = build(model) if isinstance(model, str) else model
    return model.example_inputs(batch=batch)
