"""Pictures of transformed models: fixed points framed with their bodies, wormholes drawn to their
projection boxes, probes in their own colour, and long arrows kept inside the canvas."""
from __future__ import annotations

import pytest
import torch

import fxwormhole
from fxwormhole import SALConfig, WormholeConfig, zoo
from fxwormhole.capture import capture
from fxwormhole.analysis import candidate_spans, layer_table
from fxwormhole.drawing import (HIGHLIGHT_COLORS, SPAN_COLOR, build_display_graph, draw_graph, draw_transformed,
                                transformed_display)

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(model, x, sal=None, **cfg):
    return fxwormhole.transform(model, (x,), WormholeConfig(**cfg), sal=sal)


def test_a_fixed_point_is_drawn_in_place_with_its_wormhole_projection_and_probes():
    net = _net(zoo.MLP(), torch.randn(4, 8), SALConfig(), wormholes=[("layers.2", "layers.0")], gate_init=0.0)
    display, opts = transformed_display(net)
    dg = build_display_graph(display, **opts)
    labels = {d.id: d.label for d in dg.nodes.values()}
    (src, proj, label), = dg.wormholes
    assert dg.nodes[proj].role == "projection" and dg.nodes[proj].column == -1
    assert "wormhole_0: projection" in labels[proj] and "Linear 16->8" in labels[proj]
    assert label == "wormhole_0: one gate, open 0.5000"
    # the wormhole leaves the last hidden layer's activation and its projection feeds layers.0's input
    src_node = next(n for n in display.graph.nodes if n.name in dg.nodes[src].members)
    assert src_node.meta["fxwormhole"]["wormhole_src"] == [0]
    (after,) = [b for a, b in dg.edges if a == proj]
    assert dg.nodes[after].rank == dg.nodes[proj].rank and "add" in labels[after]
    probes = [d for d in dg.nodes.values() if d.highlight == "probe"]
    assert sorted(d.label.split("\n")[0] for d in probes) == ["head", "layers.0", "layers.1", "layers.2"]
    (frame,) = dg.frames
    assert frame.label.startswith("fixed_point_0: z* = body(z*, inputs); anderson")
    inside = {labels[b].split("\n")[0] for b in frame.boxes}
    assert {"layers.0", "layers.1", "layers.2"} <= inside and "head" not in inside and "x" not in inside
    assert proj in frame.boxes


def test_colours_are_distinct():
    colours = [*HIGHLIGHT_COLORS.values(), SPAN_COLOR]
    assert len(set(colours)) == len(colours)


def _white_border(png, width: int = 4) -> bool:
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[..., :3]
    return bool((img[:, :width] > 0.97).all() and (img[:, -width:] > 0.97).all())


def _red_share_left(png) -> float:
    """Share of the left fifth's pixels in the span colour (the lanes of the span arrows)."""
    import matplotlib.colors as mcolors
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[..., :3]
    red = torch.tensor(mcolors.to_rgb(SPAN_COLOR))
    left = torch.tensor(img[:, : img.shape[1] // 5])
    return float(((left - red).abs().max(-1).values < 0.15).float().mean())


def test_long_span_arrows_stay_inside_the_picture(tmp_path):
    pytest.importorskip("matplotlib")
    m = zoo.TransformerStack(layers=4).eval()
    gm = capture(m, m.example_inputs())
    layers = layer_table(gm)
    spans = candidate_spans(gm, layers)[:3]
    path = draw_graph(gm, tmp_path / "stack.png", spans=spans, layers=layers)
    dg = build_display_graph(gm, layers=layers, spans=spans)
    assert len(dg.spans) == 3
    assert _white_border(path)  # nothing runs off the left or right edge
    assert _red_share_left(path) > 0.001  # and the arrows are there, in the left lanes


@pytest.mark.parametrize("name", ["CNN", "LSTMClassifier"])
def test_draw_transformed_writes_a_picture(name, tmp_path):
    pytest.importorskip("matplotlib")
    model = zoo.build(name, **({"num_layers": 2} if name == "LSTMClassifier" else {}))
    net = _net(model, model.example_inputs(2)[0], SALConfig())
    path = draw_transformed(net, tmp_path / f"{name}.png", title=name)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _white_border(path)
    display, opts = transformed_display(net)
    dg = build_display_graph(display, **opts)
    assert dg.frames, "the fixed point (or recurrent module with temporal wormholes) is framed"
    if name == "CNN":  # the wormhole lands on the image input: a vector broadcast onto the map
        (_, proj, _), = dg.wormholes
        assert "broadcast onto [B,1,12,12]" in dg.nodes[proj].label
    else:
        (frame,) = dg.frames
        (box,) = frame.boxes
        assert "temporal wormhole layer1 -> layer0" in dg.nodes[box].label and dg.nodes[box].highlight == "probe"
