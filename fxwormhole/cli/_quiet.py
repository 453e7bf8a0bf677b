"""Keep third-party chatter out of the command line's output.

A command prints what fxwormhole found; notices from the libraries it drives (``torch.onnx``'s
"torchvision is not installed. Skipping torchvision::nms" lines, onnx/onnxscript/pytree
``FutureWarning``s, onnxruntime's graph notices) say nothing the user can act on. fxwormhole's own
warnings (a fixed point that did not converge: ``NonConvergenceWarning``) pass through, as one
``fxwormhole: warning: ...`` line each. Whoever asks for warnings explicitly (``python -W ...`` or
``PYTHONWARNINGS``) gets them all.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

__all__ = ["quiet_third_party", "quiet_onnxruntime", "NOISY_LOGGERS"]

#: loggers of libraries whose WARNING-level notices are not for a command-line user. A filter on each
#: (torch's logging setup, which runs at ``import torch`` inside a command, resets levels, not filters;
#: a logger's filter sees only records logged to that very logger, hence the full names)
NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core",
                 "torch.onnx._internal.exporter._onnx_program", "onnxscript", "onnx_ir", "torch._export",
                 "torch.export", "torch._dynamo", "torch._inductor")
_NOISY_WARNINGS = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _format_own_warning(message, category, filename, lineno, line=None) -> str:
    """fxwormhole's own warnings as one ``fxwormhole: warning: ...`` line: the code they would point
    at is the command line's, which the user did not write; others keep the standard format."""
    from ..runtime._warnings import NonConvergenceWarning

    if issubclass(category, NonConvergenceWarning):
        return f"fxwormhole: warning: {message}\n"
    return _STANDARD_FORMAT(message, category, filename, lineno, line)


_STANDARD_FORMAT = warnings.formatwarning


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence the libraries' notices for the duration (filters and warning filters removed afterwards)."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    before = warnings.formatwarning
    warnings.formatwarning = _format_own_warning
    with contextlib.ExitStack() as restore, warnings.catch_warnings():
        restore.callback(setattr, warnings, "formatwarning", before)
        if not sys.warnoptions:
            for category in _NOISY_WARNINGS:
                warnings.filterwarnings("ignore", category=category)
        for lg in loggers:
            lg.addFilter(_below_error)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(_below_error)


def quiet_onnxruntime() -> None:
    """Only errors from onnxruntime's C++ logger (it prints graph-optimisation notices to stderr)."""
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(3)
