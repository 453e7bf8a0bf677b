"""``fxwormhole.StatsLogger``: the figures of :func:`fxwormhole.report` into TensorBoard or any callable,
one line in a training loop.

Example::

    from torch.utils.tensorboard import SummaryWriter
    log = fxwormhole.StatsLogger(SummaryWriter("runs/wormhole"), every=10)
    for step, (x, y) in enumerate(data):
        loss = loss_fn(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
        log(net, step, loss=loss)          # every 10th step: iterations, residuals, gates, sensitivity

Or any callable that takes a dict, e.g. ``StatsLogger(print)`` or ``StatsLogger(wandb.log)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Union

from torch import nn

from .errors import ConfigError
from .stats_report import report

__all__ = ["StatsLogger"]

Sink = Union[Callable[[Dict[str, float]], Any], Any]  # a callable taking a dict, or a SummaryWriter


def _scalar(value: Any) -> float:
    return float(value.detach()) if hasattr(value, "detach") else float(value)


class StatsLogger:
    """Send the figures of :meth:`fxwormhole.report(net).metrics() <fxwormhole.stats_report.StatsReport.metrics>`
    every ``every`` steps to ``sink``.

    Args:
        sink: an object with ``add_scalar(tag, value, step)`` (``torch.utils.tensorboard.SummaryWriter``,
            one scalar per figure) or a callable taking one dict ``{"step": step, tag: value, ...}``.
        every: log on steps ``0, every, 2 * every, ...`` (each call reads the last call's statistics:
            one small host sync per fixed point).
        prefix: put in front of every tag (``"fxwormhole/fixed_point/fixed_point_0/forward_iterations_mean"``).

    The logger holds no reference to the model; call it with the model after ``backward()`` so the
    backward figures are there. Extra keyword arguments (``loss=loss``) are logged alongside.
    """

    def __init__(self, sink: Sink, *, every: int = 1, prefix: str = "fxwormhole") -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"StatsLogger(every={every!r}) is invalid: expected an int >= 1")
        if not (hasattr(sink, "add_scalar") or callable(sink)):
            raise ConfigError(f"StatsLogger(sink=...) takes a SummaryWriter (an object with add_scalar) or a callable "
                              f"taking a dict, got {type(sink).__name__}")
        self.sink, self.every, self.prefix = sink, every, prefix.rstrip("/")

    @classmethod
    def tensorboard(cls, log_dir: str | Path, **kwargs: Any) -> "StatsLogger":
        """A logger writing to a new ``torch.utils.tensorboard.SummaryWriter(log_dir)``.

        Raises:
            ConfigError: tensorboard is not installed (``pip install fxwormhole[tensorboard]``).
        """
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"StatsLogger.tensorboard needs the tensorboard package ({exc}); install it with: "
                              "pip install fxwormhole[tensorboard]") from None
        return cls(SummaryWriter(str(log_dir)), **kwargs)

    def metrics(self, net: nn.Module, **extra: Any) -> Dict[str, float]:
        """The tags and values one call logs (prefixed), without sending them."""
        figures = {**report(net).metrics(), **{k: _scalar(v) for k, v in extra.items()}}
        return {f"{self.prefix}/{k}" if self.prefix else k: v for k, v in figures.items()}

    def __call__(self, net: nn.Module, step: int, **extra: Any) -> bool:
        """Log ``net``'s figures when ``step`` is a multiple of ``every``; returns whether it logged."""
        if step % self.every:
            return False
        figures = self.metrics(net, **extra)
        if hasattr(self.sink, "add_scalar"):
            for tag, value in figures.items():
                self.sink.add_scalar(tag, value, step)
        else:
            self.sink({"step": step, **figures})
        return True

    def close(self) -> None:
        """Flush and close the sink when it can be closed (a SummaryWriter)."""
        close = getattr(self.sink, "close", None)
        if callable(close):
            close()
