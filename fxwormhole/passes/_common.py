"""Helpers shared by the passes: metadata access, running passes with typed errors, legalising."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_manager import PassManager
from torch.fx.passes.tools_common import stable_topological_sort

from ..errors import FxWormholeError

__all__ = ["META_KEY", "node_meta", "graph_meta", "run_passes", "legalize", "value_shape", "state_preserved"]

META_KEY = "fxwormhole"


def node_meta(node: fx.Node) -> dict[str, Any]:
    """The toolkit's metadata dict on ``node`` (created on first use)."""
    return node.meta.setdefault(META_KEY, {})


def graph_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """The toolkit's metadata dict on the GraphModule (created on first use)."""
    return gm.meta.setdefault(META_KEY, {})


def run_passes(gm: fx.GraphModule, passes: Sequence[Any]) -> fx.GraphModule:
    """Run ``passes`` with torch.fx's PassManager, re-raising our own errors unwrapped.

    PassManager wraps every failure in a bare ``Exception``; users should see the typed
    :class:`FxWormholeError` that says what to do.
    """
    manager = PassManager(passes=list(passes), run_checks_after_each_pass=True)
    try:
        result = manager(gm)
    except Exception as exc:  # noqa: BLE001 - unwrap and re-raise below
        cause = exc
        while cause is not None and not isinstance(cause, FxWormholeError):
            cause = cause.__cause__
        if cause is not None:
            raise cause.with_traceback(None) from None
        # Anything else: still a typed error (the cause stays chained), saying where it happened.
        root = exc.__cause__ or exc
        first = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), "")[:300]
        raise FxWormholeError(
            f"{_pass_name(exc)} failed with {type(root).__name__}: {first}; check that example_inputs are a valid "
            "call of the model (number, shapes, dtypes and devices of the tensors, matching the model's parameters); "
            "if they are, please report this model to fxwormhole") from root
    return result.graph_module


def _pass_name(exc: BaseException) -> str:
    """``"pass 'InsertWormholes'"`` from PassManager's wrapper message (or a generic phrase)."""
    import re

    found = re.search(r"running the '(\w+)' pass", str(exc))
    return f"pass {found.group(1)!r}" if found else "a graph pass"


def legalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Re-order nodes topologically, keeping the original order where data flow allows; lint; recompile.

    The graph's Node objects are replaced: refer to nodes by name across this call.
    """
    stable_topological_sort(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def value_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Static shape of a node's tensor value, from its fake value (None if unknown / not a tensor)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


@contextlib.contextmanager
def state_preserved(*modules: torch.nn.Module) -> Iterator[None]:
    """Run forwards of ``modules`` without leaving a trace the user could see.

    A pass that evaluates the graph (example values, the coupling check, the self-check) would
    otherwise update BatchNorm running statistics, ``num_batches_tracked``, probe averages and any
    buffer a forward mutates in place, and advance the global random number generators (dropout).
    Buffers are restored in place (tensor identity is kept, so aliases stay valid) and the RNG
    state of the CPU and of every device the modules use is restored on exit.
    """
    saved = [(owner, name, b, b.detach().clone())
             for m in modules for owner in m.modules() for name, b in owner._buffers.items() if b is not None]
    cuda = sorted({t.device.index or 0 for m in modules for t in [*m.parameters(), *m.buffers()]
                   if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        with torch.no_grad():
            for owner, name, b, value in saved:
                owner._buffers[name] = b  # a forward may rebind a buffer (``self.n = self.n + 1``)
                b.copy_(value)  # always: ATen's batch_norm updates running stats without a version bump
