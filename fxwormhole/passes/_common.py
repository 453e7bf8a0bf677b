"""Helpers shared by the passes: running passes with typed errors, legalising, shapes, side-effect-free runs."""
from __future__ import annotations

import contextlib
import copy
import heapq
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_manager import PassManager

from .._text import EXAMPLE_INPUTS_HINT, first_line
from ..config import WormholeConfig
from ..errors import FxWormholeError
from ..runtime.wormhole import Wormhole

__all__ = ["run_passes", "legalize", "value_shape", "fake_value", "state_preserved", "build_wormhole"]


def run_passes(gm: fx.GraphModule, passes: Sequence[Any], *, check: Any = None) -> fx.GraphModule:
    """Run ``passes`` with torch.fx's PassManager, re-raising our own errors unwrapped.

    Args:
        gm: the graph to rewrite (in place).
        passes: ``PassBase`` instances, run in order.
        check: a :class:`~fxwormhole.passes.verify.PipelineCheck` to run before the first pass and
            after each pass (lint, shapes, equal to the original at initialisation); None: no check.

    PassManager wraps every failure in a bare ``Exception``; users should see the typed
    :class:`FxWormholeError` that says what to do.
    """
    passes = list(passes)
    manager = PassManager(passes=passes, run_checks_after_each_pass=check is not None)
    if check is not None:
        manager.add_checks(check.watching([type(p).__name__ for p in passes]))
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
        raise FxWormholeError(
            f"{_pass_name(exc)} failed with {type(root).__name__}: {first_line(root, 300)}; {EXAMPLE_INPUTS_HINT}"
        ) from root
    return result.graph_module


def _pass_name(exc: BaseException) -> str:
    """``"pass 'InsertWormholes'"`` from PassManager's wrapper message (or a generic phrase)."""
    import re

    found = re.search(r"running the '(\w+)' pass", str(exc))
    return f"pass {found.group(1)!r}" if found else "a graph pass"


def legalize(gm: fx.GraphModule, order: Iterable[tuple[str, str]] = ()) -> fx.GraphModule:
    """Re-order nodes topologically, keeping the original order where dependencies allow; lint; recompile.

    Dependencies are the data edges plus ``order``: ``(before, after)`` node names that must stay in
    that order although no data edge says so (in-place updates, see ``_mutation.ordering_edges``).
    torch's ``stable_topological_sort`` knows only data edges and would move a read of a buffer
    across the update that fills it.
    """
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    preds = {n: set(n.all_input_nodes) for n in nodes}
    for before, after in order:
        if before in by_name and after in by_name and before != after:
            preds[by_name[after]].add(by_name[before])
    users: dict[fx.Node, list[fx.Node]] = {n: [] for n in nodes}
    for n, ps in preds.items():
        for p in ps:
            users[p].append(n)
    waiting = {n: len(ps) for n, ps in preds.items()}
    ready = [(position[n], n) for n in nodes if not waiting[n]]
    heapq.heapify(ready)
    ordered: list[fx.Node] = []
    while ready:
        _, node = heapq.heappop(ready)
        ordered.append(node)
        for user in users[node]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, (position[user], user))
    if len(ordered) != len(nodes):
        stuck = [n.name for n in nodes if waiting[n]][:5]
        raise FxWormholeError(f"legalize: the graph has a dependency cycle through {stuck}; please report this model")
    for prev, node in zip(ordered, ordered[1:]):
        if prev.next is not node:
            prev.append(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def fake_value(gm: fx.GraphModule, tensor: torch.Tensor) -> Any:
    """``tensor`` as a value for ``meta["val"]``: a fake tensor of the graph's fake mode, if it has one."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    return mode.from_tensor(tensor, static_shapes=True) if mode is not None else tensor.detach()


def value_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Static shape of a node's tensor value, from its fake value (None if unknown / not a tensor)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


@contextlib.contextmanager
def state_preserved(*modules: torch.nn.Module, seed: int | None = None) -> Iterator[None]:
    """Run forwards of ``modules`` without leaving a trace the user could see.

    A pass that evaluates the graph (example values, the coupling check, shape propagation, the
    self-check) would otherwise update BatchNorm running statistics, ``num_batches_tracked``, probe
    averages, any buffer a forward mutates in place and the fixed points' last-call stats (a module's
    ``RUN_STATE``), and advance the global random number
    generators (dropout). Buffers are restored in place (tensor identity is kept, so aliases stay
    valid); the RNG state of the CPU and of every device the modules use is restored on exit. With
    ``seed``, those generators are seeded inside, so two runs draw the same random numbers.
    """
    saved = [(owner, name, b, b.detach().clone())
             for m in modules for owner in m.modules() for name, b in owner._buffers.items() if b is not None]
    # runtime modules' last-call records (fixed-point stats): a check's run is not the user's last call
    run_state = [(owner, name, copy.copy(getattr(owner, name)))
                 for m in modules for owner in m.modules() for name in getattr(type(owner), "RUN_STATE", ())
                 if hasattr(owner, name)]
    cuda = sorted({t.device.index or 0 for m in modules for t in [*m.parameters(), *m.buffers()]
                   if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            if seed is not None:
                torch.random.default_generator.manual_seed(seed)
                for d in cuda:
                    torch.cuda.default_generators[d].manual_seed(seed)
            yield
    finally:
        with torch.no_grad():
            for owner, name, b, value in saved:
                owner._buffers[name] = b  # a forward may rebind a buffer (``self.n = self.n + 1``)
                b.copy_(value)  # always: ATen's batch_norm updates running stats without a version bump
        for owner, name, value in run_state:
            setattr(owner, name, value)


def build_wormhole(src_shape: Sequence[int], dst_shape: Sequence[int], config: WormholeConfig, *, src: str, dst: str,
                   like: torch.Tensor) -> Wormhole:
    """The :class:`~fxwormhole.runtime.wormhole.Wormhole` a config asks for, on ``like``'s device and dtype.

    The one place both placement passes (feed-forward and temporal) make wormholes: gate kind,
    initial gate and projection, gate cap and the spectral guard all come from ``config``.
    """
    module = Wormhole(src_shape, dst_shape, gate=config.gate, gate_init=config.gate_init, proj_init=config.proj_init,
                      proj_std=config.proj_std, gate_cap=config.gate_cap, src=src, dst=dst)
    if config.spectral_norm:  # the divergence guard; a zero projection stays zero
        from ..runtime.contraction import cap_spectral_norm

        cap_spectral_norm(module.proj.map)
    return module.to(device=like.device, dtype=like.dtype)
