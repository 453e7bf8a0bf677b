"""Plain-words descriptions of what a transform inserted, for the command line and the pictures: how
each wormhole maps its source's shape onto its destination's, its gate, and the sensitivity probes."""
from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["shape_text", "bridge_text", "gate_text", "wormhole_lines", "probe_line"]


def shape_text(shape: Sequence[int]) -> str:
    """``(4, 32, 4, 4)`` -> ``"[B,32,4,4]"`` (dim 0 is the batch)."""
    return "[" + ",".join(["B", *(str(int(s)) for s in tuple(shape)[1:])]) + "]"


def bridge_text(wormhole: nn.Module) -> str:
    """How a :class:`~fxwormhole.runtime.wormhole.Wormhole` carries its source value onto its destination,
    e.g. ``"[B,32,4,4] -> global avg pool -> Linear 32->1 -> broadcast onto [B,1,8,8]"``."""
    proj = wormhole.proj
    src, dst = wormhole.src_shape, wormhole.dst_shape
    layer = proj.map
    inner = getattr(layer, "parametrizations", None)
    weight = inner.weight.original if inner is not None else layer.weight  # spectral norm wraps the weight
    n_out, n_in = int(weight.shape[0]), int(weight.shape[1])
    steps = [shape_text(src)]
    if proj.kind == "features":
        steps.append(f"Linear {n_in}->{n_out}" + (" on the last dim" if len(src) > 2 else ""))
        steps.append(shape_text(dst))
    elif proj.kind == "map_to_vector":
        steps += ["global avg pool", f"Linear {n_in}->{n_out}", shape_text(dst)]
    elif proj.kind == "vector_to_map":
        steps += [f"Linear {n_in}->{n_out}", f"broadcast onto {shape_text(dst)}"]
    else:  # map -> map: 1x1 convolution, then resize the spatial dims
        steps.append(f"1x1 conv {n_in}->{n_out}")
        mid, want = tuple(src[2:]), tuple(dst[2:])
        size = "x".join(map(str, want))
        if mid != want:
            steps.append(f"adaptive avg pool to {size}" if all(m >= w for m, w in zip(mid, want))
                         else f"nearest upsample to {size}")
        steps.append(shape_text(dst))
    if inner is not None:
        steps[1] += " (spectral norm <= 1)"
    return " -> ".join(steps)


def gate_text(gate: nn.Module) -> str:
    value = float(gate.value().float().mean())
    what = {"scalar": "one gate", "channel": "one gate per channel",
            "input": "per-sample gate sigmoid(W_g h + b), bias part"}.get(gate.kind, gate.kind)
    cap = f", capped at {gate.cap:g}" if gate.cap != 1.0 else ""
    return f"{what}, open {value:.4f}{cap}"


def wormhole_lines(net: nn.Module) -> list[str]:
    """One block per wormhole: ``src -> dst``, the shape bridging, the gate."""
    from .runtime.wormhole import Wormhole
    from .transformed import public_name

    lines = []
    for path, module in net.named_modules():
        if isinstance(module, Wormhole):
            lines.append(f"{public_name(path)}: {module.src} -> {module.dst} input")
            lines.append(f"    bridge: {bridge_text(module)}")
            lines.append(f"    gate:   {gate_text(module.gate)}")
    return lines


def probe_line(net: nn.Module) -> str:
    """Whether sensitivity probes were added, and with which SAL rule."""
    from .runtime.sensitivity import probes_of

    probes = probes_of(net)
    if not probes:
        return "probes:     none (add --sal for sensitivity probes and SAL)"
    sal = net.meta.get("fxwormhole", {}).get("sensitivity", {}).get("sal") if hasattr(net, "meta") else None
    rule = "measuring only" if sal is None or not sal.enabled else f"SAL on, eta={sal.eta:g}, target={sal.target:g}"
    return f"probes:     {len(probes)} sensitivity probes ({rule})"
