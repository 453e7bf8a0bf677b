"""Long-term-dependency tasks for the experiments: adding problem, copy memory, sequential digits.

Every task gives batches ``(x [B, T, input_size], y, difficulty [B])``, a loss, a test metric and a
trivial baseline. ``difficulty`` is what the iteration plot puts on its x axis:

* adding problem: the distance between the two marked positions (a long gap is the hard case);
* copy memory and digits: ``None``: the harness then uses the trained model's per-sample test loss
  (a sample the model gets wrong is a hard one); every copy sequence has the same delay, so there is
  no structural difficulty to vary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fxwormhole.cli.demo import digits_sequences

Batch = Tuple[Tensor, Tensor, Optional[Tensor]]


class Task:
    """Base class: subclasses set the fields and implement :meth:`batch`."""

    name: str = "task"
    input_size: int = 1
    output_size: int = 1
    per_step: bool = False      # one output per time step (copy memory) or one per sequence
    metric_name: str = "loss"
    higher_is_better: bool = False
    baseline: float = math.nan  # the metric of a trivial predictor
    baseline_note: str = ""
    difficulty_name: str = "per-sample test loss"

    def batch(self, n: int, gen: torch.Generator) -> Batch:
        raise NotImplementedError

    def train_batch(self, n: int, gen: torch.Generator) -> Batch:
        return self.batch(n, gen)

    def test_set(self, n: int, seed: int) -> Batch:
        return self.batch(n, torch.Generator().manual_seed(10_000 + seed))

    def per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return self.per_sample_loss(out, y).mean()

    def metric(self, out: Tensor, y: Tensor) -> float:
        return float(self.loss(out, y))

    def tag(self) -> str:
        return self.name


@dataclass
class Adding(Task):
    """Adding problem (Hochreiter & Schmidhuber 1997): sum the two marked values of a sequence.

    Channel 0: values ``U(0, 1)``; channel 1: a marker on two distinct positions drawn uniformly.
    Predicting 1 (the mean) gives MSE 1/6 ~ 0.167; "solved" is MSE < 0.01.
    """

    T: int = 100

    def __post_init__(self) -> None:
        self.name, self.input_size, self.output_size = "adding", 2, 1
        self.metric_name, self.baseline = "test MSE", 1.0 / 6.0
        self.baseline_note = "predict 1: MSE 1/6 = 0.167; solved < 0.01"
        self.difficulty_name = "distance between the two marked positions"

    def tag(self) -> str:
        return f"adding_T{self.T}"

    def batch(self, n: int, gen: torch.Generator) -> Batch:
        values = torch.rand(n, self.T, generator=gen)
        pos = torch.rand(n, self.T, generator=gen).argsort(-1)[:, :2]  # two distinct positions
        marks = torch.zeros(n, self.T).scatter_(1, pos, 1.0)
        y = (values * marks).sum(1)
        return torch.stack([values, marks], -1), y, (pos[:, 0] - pos[:, 1]).abs().float()

    def per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return (out.squeeze(-1) - y) ** 2


@dataclass
class CopyMemory(Task):
    """Copy memory (Arjovsky et al. 2016): recall 10 symbols from {1..8} after a delay of ``T``.

    Input alphabet: 0 blank, 1..8 symbols, 9 delimiter (one-hot, 10 channels); length ``T + 20``.
    Targets: blanks, then the 10 symbols in the last 10 steps; loss is cross-entropy over all
    ``T + 20`` steps. Memoryless baseline (blanks, then uniform over 8 symbols): ``10 log 8 / (T + 20)``.
    """

    T: int = 100
    symbols: int = 8
    length: int = 10

    def __post_init__(self) -> None:
        self.name, self.per_step = "copy", True
        self.input_size, self.output_size = self.symbols + 2, self.symbols + 1
        self.metric_name = "test cross-entropy"
        self.baseline = self.length * math.log(self.symbols) / (self.T + 2 * self.length)
        self.baseline_note = f"memoryless: 10 log 8 / (T + 20) = {self.baseline:.4f}"

    def tag(self) -> str:
        return f"copy_T{self.T}"

    def batch(self, n: int, gen: torch.Generator) -> Batch:
        L, total = self.length, self.T + 2 * self.length
        seq = torch.randint(1, self.symbols + 1, (n, L), generator=gen)
        inp = torch.zeros(n, total, dtype=torch.long)
        inp[:, :L] = seq
        inp[:, self.T + L - 1] = self.symbols + 1  # delimiter: "recall now"
        y = torch.zeros(n, total, dtype=torch.long)
        y[:, -L:] = seq
        return F.one_hot(inp, self.input_size).float(), y, None

    def per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)

    def recall_accuracy(self, out: Tensor, y: Tensor) -> float:
        """Share of the 10 recalled symbols predicted right."""
        return float((out[:, -self.length:].argmax(-1) == y[:, -self.length:]).float().mean())


class Digits(Task):
    """scikit-learn's 8x8 digits as sequences: ``rows`` (8 steps x 8 pixels) or ``pixels`` (64 x 1).

    Fixed seeded split (80% train, 20% test); training batches are drawn with replacement.
    """

    def __init__(self, mode: str = "rows", seed: int = 0) -> None:
        self.mode, self.name = mode, "digits"
        self.xtr, self.ytr, self.xte, self.yte = digits_sequences(mode, seed=seed)
        self.input_size, self.output_size, self.T = self.xtr.shape[-1], 10, self.xtr.shape[1]
        self.metric_name, self.higher_is_better = "test accuracy", True
        self.baseline = float(torch.bincount(self.ytr).max()) / len(self.ytr)
        self.baseline_note = f"majority class: {self.baseline:.3f}"

    def tag(self) -> str:
        return f"digits_{self.mode}"

    def train_batch(self, n: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.ytr), (n,), generator=gen)
        return self.xtr[idx], self.ytr[idx], None

    def test_set(self, n: int, seed: int) -> Batch:
        return self.xte[:n], self.yte[:n], None

    def per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y, reduction="none")

    def metric(self, out: Tensor, y: Tensor) -> float:
        return float((out.argmax(-1) == y).float().mean())


def make_task(name: str, T: int = 100, seed: int = 0) -> Task:
    """``adding`` / ``copy`` (length ``T``), ``digits_rows`` / ``digits_pixels``."""
    if name == "adding":
        return Adding(T=T)
    if name == "copy":
        return CopyMemory(T=T)
    if name in ("digits_rows", "digits_pixels"):
        return Digits(name.split("_")[1], seed=seed)
    raise ValueError(f"unknown task {name!r}: expected adding, copy, digits_rows or digits_pixels")


TASKS = ("adding", "copy", "digits_rows", "digits_pixels")
