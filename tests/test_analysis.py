"""analysis: layer tables, main paths, regions, spans, activations, on graphs of both front ends."""
import functools

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxwormhole import zoo
from fxwormhole.analysis import (
    activation_params, candidate_spans, classify_activation, format_layer_table,
    layer_table, main_path, module_regions, to_networkx,
)
from fxwormhole.capture import capture

FRONT_ENDS = ["symbolic_trace", "export"]


@functools.lru_cache(maxsize=None)
def _gm(name, front_end, batch=4):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    fe = "auto" if (name in ("SeqLenLoop", "TransformerStack") and front_end == "symbolic_trace") else front_end
    return capture(model, model.example_inputs(batch=batch), front_end=fe)


def _rows(layers):
    return [(l.name, l.kind, l.activation, l.in_shape, l.out_shape, l.depth) for l in layers]


def _brute_force_main_path(gm):
    """Reference: a node is on the main path iff deleting it cuts every input from the output."""
    g = to_networkx(gm)
    out = next(n.name for n in gm.graph.nodes if n.op == "output")
    sources = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    on = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        h = g.copy()
        h.remove_node(n.name)
        if not any(nx.has_path(h, s, out) for s in sources):
            on.append(n.name)
    return on


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("name", [n for n in zoo.ZOO if n != "DataDependentBreak"])
def test_main_path_equals_brute_force_cut(name, front_end):
    gm = _gm(name, front_end)
    assert main_path(gm) == _brute_force_main_path(gm)


@pytest.mark.parametrize("name", [n for n in zoo.ZOO if n not in ("DataDependentBreak", "SeqLenLoop", "TransformerStack")])
def test_front_ends_agree(name):
    a, b = _gm(name, "symbolic_trace"), _gm(name, "export")
    assert _rows(layer_table(a)) == _rows(layer_table(b))
    assert candidate_spans(a) == candidate_spans(b)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_mlp(front_end):
    gm = _gm("MLP", front_end)
    layers = layer_table(gm)
    assert _rows(layers) == [
        ("layers.0", "linear", "tanh", (4, 8), (4, 16), 0),
        ("layers.1", "linear", "tanh", (4, 16), (4, 16), 1),
        ("layers.2", "linear", "tanh", (4, 16), (4, 16), 2),
        ("head", "linear", None, (4, 16), (4, 4), 3),
    ]
    assert [l.is_output_layer for l in layers] == [False, False, False, True]
    assert all(l.module_type == "Linear" for l in layers)
    assert layers[0].output_node == layers[0].activation_node != layers[0].node
    path = main_path(gm)
    for l in layers:
        assert l.node in path and l.output_node in path
    assert candidate_spans(gm, layers) == [("layers.2", "layers.0"), ("layers.2", "layers.1"), ("layers.1", "layers.0")]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_cnn(front_end):
    gm = _gm("CNN", front_end)
    layers = layer_table(gm)
    assert _rows(layers) == [
        ("conv1", "conv2d", "relu", (4, 1, 12, 12), (4, 8, 12, 12), 0),
        ("conv2", "conv2d", "relu", (4, 8, 6, 6), (4, 8, 6, 6), 1),
        ("fc", "linear", "relu", (4, 72), (4, 32), 2),
        ("head", "linear", None, (4, 32), (4, 4), 3),
    ]
    path = main_path(gm)
    assert len(path) == 10  # conv, act, pool, conv, act, pool, flatten, fc, relu, head
    assert candidate_spans(gm, layers)[0] == ("fc", "conv1")


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_residual_mlp_blocks_are_units(front_end):
    gm = _gm("ResidualMLP", front_end)
    layers = layer_table(gm)
    by = {l.name: l for l in layers}
    assert by["stem"].depth == 0 and by["head"].depth == 1
    for b in ("blocks.0", "blocks.1"):
        assert not by[f"{b}.linear1"].on_main_path and by[f"{b}.linear1"].activation == "relu"
        assert by[f"{b}.linear2"].depth is None
    spans = candidate_spans(gm, layers)
    assert spans[:3] == [("blocks.1", "stem"), ("blocks.1", "blocks.0"), ("blocks.0", "stem")]
    regions = module_regions(gm)
    path = main_path(gm)
    for b in ("blocks.0", "blocks.1"):
        assert regions[b].output in path and regions[b].module_type == "ResidualBlock"
    # block 0 reads the stem's activation, block 1 reads block 0's output
    assert regions["blocks.0"].inputs == (by["stem"].output_node,)
    assert regions["blocks.1"].inputs == (regions["blocks.0"].output,)


def test_transformer_stack():
    gm = _gm("TransformerStack", "export")
    layers = layer_table(gm)
    assert [l.name for l in layers] == [
        "layers.0.self_attn.out_proj", "layers.0.linear1", "layers.0.linear2",
        "layers.1.self_attn.out_proj", "layers.1.linear1", "layers.1.linear2", "head"]
    assert [l.depth for l in layers] == [None] * 6 + [0]
    assert layers[1].activation == "relu" and layers[1].out_shape == (4, 6, 32)
    regions = module_regions(gm)
    path = main_path(gm)
    x = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert regions["layers.0"].inputs[0] == x
    assert regions["layers.0"].output in path and regions["layers.1"].output in path
    assert regions["layers.1"].inputs == (regions["layers.0"].output,)
    assert regions["layers.0.self_attn"].output not in path
    assert candidate_spans(gm, layers)[0] == ("layers.1", "layers.0")


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("name,kind", [("LSTMClassifier", "lstm"), ("GRUClassifier", "gru"), ("RNNClassifier", "rnn")])
def test_recurrent_classifiers(name, kind, front_end):
    gm = _gm(name, front_end)
    layers = layer_table(gm)
    assert _rows(layers) == [
        ("proj", "linear", "tanh", (4, 5, 6), (4, 5, 12), 0),
        ("rnn", kind, None, (4, 5, 12), (4, 5, 12), 1),
        ("head", "linear", None, (4, 12), (4, 3), 2),
    ]
    assert candidate_spans(gm, layers) == [("rnn", "proj")]


@pytest.mark.parametrize("name", ["GRUCellLoop", "SeqLenLoop"])
def test_cell_loop_only_last_step_on_main_path(name):
    gm = _gm(name, "export")
    layers = layer_table(gm)
    assert [(l.name, l.kind, l.depth) for l in layers] == [
        ("cell", "gru_cell", None), ("cell", "gru_cell", None), ("cell", "gru_cell", None),
        ("cell", "gru_cell", 0), ("head", "linear", 1)]
    assert candidate_spans(gm, layers) == []  # every hidden layer is the same module
    regions = module_regions(gm)
    assert {"cell", "cell@1", "cell@2", "cell@3"} <= set(regions)
    assert regions["cell@3"].call_index == 3 and regions["cell@3"].path == "cell"


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_two_in_two_out(front_end):
    gm = _gm("TwoInTwoOut", front_end)
    layers = layer_table(gm)
    by = {l.name: l for l in layers}
    assert by["enc_a"].depth is None and by["enc_b"].depth is None
    assert by["trunk1"].depth == 0 and by["trunk2"].depth == 1 and by["trunk2"].activation == "sigmoid"
    assert by["head_a"].is_output_layer and by["head_b"].is_output_layer and by["head_a"].depth is None
    assert gm.graph.find_nodes(op="call_function", target=torch.cat) or front_end == "export"
    assert main_path(gm)[0] == "cat"
    assert candidate_spans(gm, layers) == [
        ("trunk2", "trunk1"), ("trunk2", "enc_a"), ("trunk2", "enc_b"), ("trunk1", "enc_a"), ("trunk1", "enc_b")]


class _Acts(nn.Module):
    def __init__(self):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(3, 3) for _ in range(9))
        self.m_tanh, self.m_leaky, self.m_relu6, self.m_gelu = nn.Tanh(), nn.LeakyReLU(0.3), nn.ReLU6(), nn.GELU("tanh")

    def forward(self, x):
        l = self.lins
        ys = [torch.tanh(l[0](x)), F.leaky_relu(l[1](x), 0.2), self.m_leaky(l[2](x)), l[3](x).sigmoid(),
              F.relu6(l[4](x)), self.m_relu6(l[5](x)), F.gelu(l[6](x), approximate="tanh"),
              self.m_gelu(l[7](x)), l[8](x) * 2]
        return sum(ys)


EXPECTED_ACTS = [
    ("tanh", ()), ("leaky_relu", (("negative_slope", 0.2),)), ("leaky_relu", (("negative_slope", 0.3),)),
    ("sigmoid", ()), ("hardtanh", (("max_val", 6.0), ("min_val", 0.0))),
    ("hardtanh", (("max_val", 6.0), ("min_val", 0.0))), ("gelu", (("approximate", "tanh"),)),
    ("gelu", (("approximate", "tanh"),)), (None, ()),
]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_activation_forms(front_end):
    m = _Acts()
    gm = capture(m, torch.randn(2, 3), front_end=front_end)
    layers = layer_table(gm)
    assert [(l.activation, l.activation_params) for l in layers] == EXPECTED_ACTS
    # the activation found, with its parameters, is the function the graph computes after the layer
    interp = fx.Interpreter(gm)
    env = {}
    orig = interp.run_node
    interp.run_node = lambda n: env.setdefault(n.name, orig(n))
    interp.run(torch.randn(5, 3))
    refs = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "leaky_relu": F.leaky_relu, "hardtanh": F.hardtanh,
            "gelu": F.gelu}
    for l in layers[:-1]:
        want = refs[l.activation](env[l.node], **dict(l.activation_params))
        torch.testing.assert_close(env[l.activation_node], want, rtol=0, atol=0)


def test_classify_activation_direct_forms():
    g = fx.Graph()
    x = g.placeholder("x")
    nodes = {
        "relu": g.call_function(torch.ops.aten.relu.default, (x,)),
        "silu": g.call_function(torch.ops.aten.silu_.default, (x,)),
        "elu": g.call_function(F.elu, (x,)),
        "softsign": g.call_function(F.softsign, (x,)),
        "tanh": g.call_method("tanh_", (x,)),
        None: g.call_function(torch.add, (x, x)),
    }
    gm = fx.GraphModule(nn.Module(), g)
    for expected, node in nodes.items():
        assert classify_activation(gm, node) == expected
    assert activation_params(gm, nodes["elu"]) == {"alpha": 1.0}


def test_networkx_view_of_a_captured_graph():
    gm = _gm("MLP", "symbolic_trace")
    dag = to_networkx(gm)
    assert nx.is_directed_acyclic_graph(dag)
    assert dag.nodes["layers_0"]["kind"] == "linear" and dag.nodes["tanh"]["kind"] == "tanh"


def test_format_layer_table():
    text = format_layer_table(layer_table(_gm("CNN", "symbolic_trace")))
    lines = text.splitlines()
    assert lines[0].split() == ["#", "layer", "node", "kind", "activation", "in", "out", "depth"]
    assert lines[2].split()[:5] == ["0", "conv1", "conv1", "conv2d", "relu"]
    assert "4x1x12x12" in lines[2] and lines[-1].endswith("3 (out)")
