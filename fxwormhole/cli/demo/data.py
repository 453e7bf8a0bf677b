"""The demo's data: scikit-learn's bundled 8x8 digits as sequences (no download)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ...errors import ConfigError

__all__ = ["digits_sequences"]


def digits_sequences(mode: str = "rows", *, test_fraction: float = 0.2, seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits as sequences: ``(x_train, y_train, x_test, y_test)``.

    ``mode="rows"``: ``[N, 8, 8]`` (one row of 8 pixels per step); ``mode="pixels"``: ``[N, 64, 1]``.
    Pixels are scaled to [0, 1]; the split is a seeded permutation (no download).
    """
    if mode not in ("rows", "pixels"):
        raise ConfigError(f"digits_sequences(mode={mode!r}): expected 'rows' or 'pixels'")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("the digits data needs scikit-learn: pip install scikit-learn "
                          "(it is in the dev extra: pip install fxwormhole[dev])") from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    x = x.view(-1, 8, 8) if mode == "rows" else x.view(-1, 64, 1)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]
