"""Tasks with a controllable per-sample difficulty, for the adaptive-depth experiments.

Every task returns ``(x, y, difficulty)`` batches from a seeded generator; ``difficulty`` is an
integer level per sample. ``test_set`` holds the same number of samples at every level, so
per-level figures are not dominated by the common levels.

* :class:`Addition`: add two binary numbers (least significant bit first), one sum bit per
  position. A position *propagates* when exactly one of its bits is 1; the carry into position
  ``i`` is decided by the nearest position below ``i`` that does not propagate (it *generates* a
  carry when both bits are 1, *kills* it when both are 0; the low end kills). The level of a
  sample is the longest run of propagating positions: how far a network must look before every
  carry is certain. The position before a run generates or kills with probability 1/2 whatever the
  run's length, so no learned prior answers a long run: a fixed-depth network needs depth for it.
  A convolution of kernel 3 moves information one position per layer, so a weight-tied body of two
  such layers run K times reaches about ``2K + 1`` positions.

  ``carry_chain`` is the second measure: the most positions one carry travels (0 when nothing
  generates). A network with per-sample halting can answer "no carry" wherever no carry has
  arrived and stop when no carry is still moving, so the chain, not the run, is the least depth
  such a network needs; a fixed-depth network has no such test and needs the run. The
  experiments report rho against both.
* :class:`NoisyDigits`: scikit-learn's 8x8 digits corrupted by level ``d`` in {0, .25, .5, .75, 1}
  (Gaussian noise of std ``0.5 d`` plus each pixel zeroed with probability ``0.3 d``), the
  prototype's task. Depth does not help there (tied K=1 is as good as K=3 or 6); it is used to
  study how the input's norm enters the convergence test.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

Batch = Tuple[Tensor, Tensor, Tensor]


def longest_run(mask: np.ndarray) -> np.ndarray:
    """Length of the longest run of ``True`` along the last axis, per row."""
    run = np.zeros(mask.shape[0], dtype=np.int64)
    best = np.zeros_like(run)
    for i in range(mask.shape[1]):
        run = np.where(mask[:, i], run + 1, 0)
        best = np.maximum(best, run)
    return best


def longest_carry(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the most positions one carry travels in ``a + b`` (bits LSB first, one extra
    position for the final carry): a generate at ``j`` followed by ``m`` propagates counts ``m + 1``.
    0 when no position generates."""
    reach = np.zeros(a.shape[0], dtype=np.int64)  # positions the carry into the current position has travelled
    best = np.zeros_like(reach)
    for i in range(a.shape[1] + 1):
        best = np.maximum(best, reach)
        if i == a.shape[1]:
            break
        gen, prop = a[:, i] & b[:, i], a[:, i] ^ b[:, i]
        reach = np.where(gen, 1, np.where(prop & (reach > 0), reach + 1, 0))
    return best


class Addition:
    """``a + b`` for ``bits``-bit numbers, written on ``bits + 1`` positions (LSB first).

    Input ``[B, 2, bits + 1]`` with bits coded as -1/+1 (0 is the convolution's padding, so the
    ends are visible); target ``[B, bits + 1]`` in {0, 1}; level = the longest run of
    propagating positions, 0..``bits``.
    """

    name = "addition"
    per_position = True

    def __init__(self, bits: int = 11) -> None:
        self.bits = bits
        self.length = bits + 1
        self.levels = np.arange(bits + 1)
        self.in_channels = 2

    def _candidates(self, n: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        # a per-sample propagate probability spreads the difficulty over all levels
        q = rng.random((n, 1))
        prop = rng.random((n, self.bits)) < q
        a = rng.random((n, self.bits)) < 0.5
        gen = rng.random((n, self.bits)) < 0.5  # for non-propagating positions: generate (1,1) or kill (0,0)
        b = np.where(prop, ~a, a)
        a = np.where(prop, a, gen)
        b = np.where(prop, b, gen)
        return a, b

    def _encode(self, a: np.ndarray, b: np.ndarray) -> Batch:
        weights = 1 << np.arange(self.bits, dtype=np.int64)
        s = (a.astype(np.int64) * weights).sum(1) + (b.astype(np.int64) * weights).sum(1)
        y = (s[:, None] >> np.arange(self.length)) & 1
        pad = np.zeros((len(a), 1), dtype=bool)
        bits = np.stack([np.concatenate([a, pad], 1), np.concatenate([b, pad], 1)], 1)
        x = np.where(bits, 1.0, -1.0)
        d = longest_run(a != b)
        return (torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32),
                torch.tensor(d, dtype=torch.int64))

    def sample(self, n: int, rng: np.random.Generator, *, per_level: bool = False) -> Batch:
        """``n`` samples with the difficulty uniform over the levels (``per_level``: exactly
        ``n // levels`` per level, ordered by level)."""
        want = n // len(self.levels) if per_level else None
        picked_a, picked_b = [], []
        counts = np.zeros(len(self.levels), dtype=np.int64)
        target = np.full(len(self.levels), want if per_level else 0)
        if not per_level:  # uniform level per sample
            target = np.bincount(rng.integers(0, len(self.levels), n), minlength=len(self.levels))
        while (counts < target).any():
            a, b = self._candidates(max(4 * n, 4096), rng)
            d = longest_run(a != b)
            for lvl in np.nonzero(counts < target)[0]:
                idx = np.nonzero(d == lvl)[0][: target[lvl] - counts[lvl]]
                picked_a.append(a[idx]); picked_b.append(b[idx])
                counts[lvl] += len(idx)
        a, b = np.concatenate(picked_a), np.concatenate(picked_b)
        x, y, d = self._encode(a, b)
        order = torch.argsort(d, stable=True) if per_level else torch.randperm(len(d), generator=torch.Generator().manual_seed(int(rng.integers(1 << 31))))
        return x[order], y[order], d[order]

    def natural(self, n: int, rng: np.random.Generator) -> Batch:
        """Uniformly random numbers: long carry chains are rare (the distribution of real inputs)."""
        a = rng.random((n, self.bits)) < 0.5
        b = rng.random((n, self.bits)) < 0.5
        return self._encode(a, b)

    @staticmethod
    def carry_chain(x: Tensor) -> Tensor:
        """The second difficulty measure: the longest carry chain (:func:`longest_carry`) per sample."""
        bits = (x[:, :, :-1] > 0).numpy()
        return torch.tensor(longest_carry(bits[:, 0], bits[:, 1]))

    @staticmethod
    def correct(logits: Tensor, y: Tensor) -> Tensor:
        """Per sample: every sum bit right."""
        return ((logits > 0).float() == y).all(-1)

    @staticmethod
    def loss(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        l = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)
        return l.mean() if reduction == "mean" else l


class NoisyDigits:
    """The prototype's noisy digits: fixed split (1437 train, 360 test), fresh corruption of the
    training set every epoch, every test image at every level with fixed noise. Inputs are
    standardised with the clean training mean/std; ``normalise`` rescales each sample to norm 8."""

    levels = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    noise, occlusion = 0.5, 0.3

    def __init__(self, normalise: bool = False) -> None:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = X / 16.0
        perm = np.random.default_rng(0).permutation(len(X))
        tr, te = perm[:1437], perm[1437:]
        self.x_train, self.y_train = X[tr], torch.tensor(y[tr])
        self.mean, self.std = self.x_train.mean(0), self.x_train.std(0) + 0.1
        self.normalise = normalise
        d = np.repeat(self.levels, len(te))
        self.x_test = self._prepare(self._corrupt(np.tile(X[te], (len(self.levels), 1)), d, np.random.default_rng(1)))
        self.y_test = torch.tensor(np.tile(y[te], len(self.levels)))
        self.d_test = torch.tensor(d)

    def _corrupt(self, X: np.ndarray, d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal(X.shape) * (self.noise * d)[:, None]
        mask = rng.random(X.shape) < (self.occlusion * d)[:, None]
        return np.where(mask, 0.0, X + noise)

    def _prepare(self, X: np.ndarray) -> Tensor:
        Z = (X - self.mean) / self.std
        if self.normalise:
            Z = Z / np.linalg.norm(Z, axis=1, keepdims=True) * 8.0
        return torch.tensor(Z, dtype=torch.float32)

    def train_epoch(self, rng: np.random.Generator) -> Batch:
        """The training set, shuffled, each sample at a random level with fresh corruption."""
        d = rng.choice(self.levels, size=len(self.x_train))
        x = self._prepare(self._corrupt(self.x_train, d, rng))
        order = torch.tensor(rng.permutation(len(d)))
        return x[order], self.y_train[order], torch.tensor(d)[order]
