"""Each pass on its own, in the torch.fx style: run it on a tiny captured module, assert on the nodes,
the typed metadata it records and the values the graph computes (against the module it came from)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxwormhole as fw
from fxwormhole.capture import capture_graph
from fxwormhole.passes._common import run_passes
from fxwormhole.passes.cell_loops import FuseCellLoops
from fxwormhole.passes.insert_wormholes import InsertWormholes, wormhole_read
from fxwormhole.passes.meta import BackEdge, TemporalPlacement, graph_record, node_info
from fxwormhole.passes.normalise_export import NormaliseExport
from fxwormhole.passes.plan_wormholes import PlanWormholes
from fxwormhole.passes.recurrent import DecomposeRecurrent
from fxwormhole.passes.sensitivity_annotate import SensitivityAnnotate
from fxwormhole.passes.sensitivity_insert import SensitivityInsert
from fxwormhole.passes.temporal_wormhole import TemporalWormholes
from fxwormhole.passes.wrap_fixed_points import WrapFixedPoints
from fxwormhole.runtime.cell_loop import CellLoop
from fxwormhole.runtime.fixed_point import FixedPoint
from fxwormhole.runtime.recurrent import ExplicitLSTM
from fxwormhole.runtime.sensitivity import DenseProbe
from fxwormhole.runtime.wormhole import Wormhole
from helpers import TinyLSTM, TinyMLP

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(4, 5)
SPAN = fw.WormholeConfig(wormholes=[("fc3", "fc1")])


def _mlp(front_end: str = "symbolic_trace"):
    model = TinyMLP().eval()
    return model, capture_graph(model, (X,), front_end=front_end)


def _ops(gm: fx.GraphModule) -> list[tuple[str, object]]:
    return [(n.op, n.target) for n in gm.graph.nodes]


def _planned():
    model, captured = _mlp()
    return model, run_passes(captured.graph_module, [PlanWormholes(SPAN)])


def _inserted():
    model, gm = _planned()
    return model, run_passes(gm, [InsertWormholes(SPAN)])


# --------------------------------------------------------------------------------------- plan
def test_plan_records_the_wormhole_and_changes_no_node():
    model, captured = _mlp()
    gm = captured.graph_module
    before = _ops(gm)
    result = PlanWormholes(SPAN)(gm)
    assert not result.modified and _ops(gm) == before
    (spec,) = graph_record(gm).wormholes
    # the source is fc3's activation, the modulated value is fc1's input, used by fc1 only
    assert (spec.src, spec.dst, spec.src_node, spec.dst_input, spec.dst_users) == ("fc3", "fc1", "tanh_2", "x", ("fc1",))
    assert spec.src_shape == (4, 6) and spec.dst_shape == (4, 5)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert node_info(nodes["tanh_2"]).wormhole_src == (0,) and node_info(nodes["fc1"]).wormhole_dst == (0,)
    assert node_info(nodes["fc2"]).wormhole_src is None


def test_plan_refuses_a_wormhole_pointing_forward():
    _, captured = _mlp()
    with pytest.raises(fw.PlacementError, match="swap them"):
        run_passes(captured.graph_module, [PlanWormholes(fw.WormholeConfig(wormholes=[("fc1", "fc3")]))])


# --------------------------------------------------------------------------------------- insert
def test_insert_adds_read_modulated_write_and_keeps_a_dag_equal_to_the_original():
    model, gm = _planned()
    result = InsertWormholes(SPAN)(gm)
    assert result.modified
    by_role = {node_info(n).role: n for n in gm.graph.nodes if node_info(n).role}
    read, mod, write = by_role["read"], by_role["modulated"], by_role["write"]
    assert read.target is wormhole_read and read.args[0].name == "x"
    assert mod.target is operator.add and mod.args == (read.args[0], read)
    fc1 = next(n for n in gm.graph.nodes if n.target == "fc1")
    assert fc1.args[0] is mod  # fc1 now reads the modulated input
    assert write.op == "call_module" and isinstance(gm.get_submodule(write.target), Wormhole)
    assert write.args[0].name == "tanh_2"
    assert graph_record(gm).back_edges == (BackEdge(write.name, read.name, 0),)
    assert all("val" in n.meta for n in gm.graph.nodes if n.op != "output")
    torch.testing.assert_close(gm(X), model(X), rtol=0, atol=0)  # read_i is zero: the original network


# --------------------------------------------------------------------------------------- wrap
def test_wrap_fuses_the_cycle_into_one_fixed_point_node():
    model, gm = _inserted()
    result = WrapFixedPoints(SPAN, (X,))(gm)
    assert result.modified
    (fp_node,) = [n for n in gm.graph.nodes if node_info(n).role == "fixed_point"]
    fp = gm.get_submodule(fp_node.target)
    assert isinstance(fp, FixedPoint) and fp_node.target == "fixed_point_0"
    info = node_info(fp_node).fixed_point
    assert info.wormholes == (0,) and {"fc1", "fc2", "fc3", "tanh_2"} <= set(info.fused_nodes)
    remaining = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert remaining == {"fixed_point_0", "head"}  # the cycle's layers live in the body now
    body_nodes = {n.name for n in fp.body.graph.nodes}
    assert {"fc1", "fc2", "fc3", "tanh_2"} <= body_nodes and "wormhole_0" not in {str(n.target) for n in fp.body.graph.nodes}
    assert graph_record(gm).fixed_points == ("fixed_point_0",)
    torch.testing.assert_close(gm(X), model(X))
    assert int(fp.stats.iterations.max()) == 1  # closed wormhole: one evaluation


# --------------------------------------------------------------------------------------- normalise
def test_normalise_turns_aten_layers_into_the_users_modules():
    model, captured = _mlp("export")
    gm = captured.graph_module
    aten = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(aten) == 4 and not any(n.op == "call_module" and n.target.startswith("fc") for n in gm.graph.nodes)
    result = NormaliseExport(captured.source)(gm)
    assert result.modified and graph_record(gm).normalised == 4
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in ("fc1", "fc2", "fc3", "head")]
    assert [n.target for n in layers] == ["fc1", "fc2", "fc3", "head"]
    assert all(isinstance(gm.get_submodule(n.target), nn.Linear) for n in layers)
    assert all(node_info(n).normalised_from == "aten.linear.default" for n in layers)
    assert all(isinstance(n.meta.get("val"), torch.Tensor) for n in layers)
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # weights are read by the modules
    torch.testing.assert_close(gm(X), model(X), rtol=0, atol=0)
    assert set(gm.state_dict()) == set(model.state_dict())


def test_normalise_rereads_lstm_outputs_and_keeps_shapes():
    model = TinyLSTM().eval()
    x = torch.randn(2, 4, 3)
    captured = capture_graph(model, (x,), front_end="export")
    gm = run_passes(captured.graph_module, [NormaliseExport(captured.source)])
    (rnn,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "rnn"]
    out, (h, c) = rnn.meta["val"]  # nn.LSTM's (out, (h, c)), not aten's (out, h, c)
    assert tuple(out.shape) == (2, 4, 5) and tuple(h.shape) == tuple(c.shape) == (2, 2, 5)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------- decompose
def test_decompose_swaps_the_module_and_records_the_layout():
    model = TinyLSTM().eval()
    x = torch.randn(2, 4, 3)
    gm = capture_graph(model, (x,)).graph_module
    before = _ops(gm)
    result = DecomposeRecurrent()(gm)
    assert result.modified and _ops(gm) == before  # same nodes; the module at "rnn" changed
    assert isinstance(gm.get_submodule("rnn"), ExplicitLSTM)
    node = next(n for n in gm.graph.nodes if n.target == "rnn")
    info = node_info(node).recurrent
    assert (info.path, info.decomposed, info.mode, info.num_layers) == ("rnn", True, "LSTM", 2)
    assert info.gate_order == ("i", "f", "g", "o") and info.layers == ("layer0", "layer1")
    assert graph_record(gm).recurrent == {"rnn": "decomposed"}
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- temporal
def test_temporal_places_the_policy_and_records_what_it_consumed():
    model = TinyLSTM().eval()
    x = torch.randn(2, 4, 3)
    gm = run_passes(capture_graph(model, (x,)).graph_module, [DecomposeRecurrent(), TemporalWormholes(fw.WormholeConfig())])
    rnn = gm.get_submodule("rnn")
    assert rnn.temporal_pairs == (("layer1", "layer0"),)
    assert graph_record(gm).temporal == TemporalPlacement(placed={"rnn": (("layer1", "layer0"),)}, policy_consumed=True)
    node = next(n for n in gm.graph.nodes if n.target == "rnn")
    assert node_info(node).recurrent.temporal_wormholes == (("layer1", "layer0"),)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    # under the policy the feed-forward plan then places nothing
    gm = run_passes(gm, [PlanWormholes(fw.WormholeConfig())])
    assert graph_record(gm).wormholes == ()


def test_temporal_consumes_only_the_pairs_that_name_recurrent_layers():
    class RnnThenMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 5, num_layers=2, batch_first=True)
            self.fc1, self.fc2, self.fc3, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = self.rnn(x)[0][:, -1]
            return self.head(torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))))

    model, x = RnnThenMLP().eval(), torch.randn(2, 4, 3)
    config = fw.WormholeConfig(wormholes=[("rnn.layer1", "rnn.layer0"), ("fc3", "fc1")])
    gm = run_passes(capture_graph(model, (x,)).graph_module,
                    [DecomposeRecurrent(), TemporalWormholes(config), PlanWormholes(config)])
    temporal = graph_record(gm).temporal
    assert temporal.consumed_pairs == (("rnn.layer1", "rnn.layer0"),) and not temporal.policy_consumed
    assert [(s.src, s.dst) for s in graph_record(gm).wormholes] == [("fc3", "fc1")]


# --------------------------------------------------------------------------------------- cell loops
class _TinyCellLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.GRUCell(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 4)
        for t in range(3):
            h = self.cell(x[:, t], h)
        return self.head(h)


def test_cell_loops_fuses_an_unrolled_loop_and_records_it():
    model, x = _TinyCellLoop().eval(), torch.randn(2, 3, 3)
    gm = capture_graph(model, (x,)).graph_module
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["cell", "cell", "cell", "head"]
    gm = run_passes(gm, [FuseCellLoops(fw.WormholeConfig())])
    assert [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")] == [
        ("get_attr", "cell.weight_ih"), ("get_attr", "cell.weight_hh"), ("get_attr", "cell.bias_ih"),
        ("get_attr", "cell.bias_hh"), ("call_module", "cell_loop_0"), ("call_module", "head")]
    loop = gm.get_submodule("cell_loop_0")
    assert isinstance(loop, CellLoop) and loop.temporal_pairs == (("layer0", "layer0"),)
    node = next(n for n in gm.graph.nodes if n.target == "cell_loop_0")
    info = node_info(node).cell_loop
    assert (info.cells, info.mode, info.steps, info.temporal_wormholes) == (("cell",), "GRU", 3, (("cell", "cell"),))
    assert graph_record(gm).temporal == TemporalPlacement(placed={"cell_loop_0": (("cell", "cell"),)}, policy_consumed=True)
    assert all("val" in n.meta for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)  # closed at initialisation
    # the plan then places nothing
    gm = run_passes(gm, [PlanWormholes(fw.WormholeConfig())])
    assert graph_record(gm).wormholes == ()


def test_cell_loops_leaves_a_loop_no_wormhole_names():
    model, x = _TinyCellLoop().eval(), torch.randn(2, 3, 3)
    gm = capture_graph(model, (x,)).graph_module
    before = _ops(gm)
    result = FuseCellLoops(fw.WormholeConfig(wormholes=[("head", "cell")]))(gm)
    assert not result.modified and _ops(result.graph_module) == before


# --------------------------------------------------------------------------------------- sensitivity
def test_annotate_records_what_each_probe_needs_and_changes_no_node():
    model, captured = _mlp()
    gm = captured.graph_module
    before = _ops(gm)
    SensitivityAnnotate(fw.SALConfig())(gm)
    assert _ops(gm) == before
    anns = {n.target: node_info(n).sensitivity for n in gm.graph.nodes if node_info(n).sensitivity is not None}
    assert set(anns) == {"fc1", "fc2", "fc3", "head"}
    assert (anns["fc1"].kind, anns["fc1"].activation, anns["fc1"].neurons, anns["fc1"].calls) == ("linear", "tanh", 6, 1)
    assert anns["head"].activation == "identity" and anns["fc1"].probe is None
    u = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(anns["fc1"].derivatives.d1(u), 1 - torch.tanh(u) ** 2)


def test_insert_puts_a_probe_on_every_annotated_layer_and_keeps_the_values():
    model, captured = _mlp()
    gm = run_passes(captured.graph_module, [SensitivityAnnotate(fw.SALConfig()), SensitivityInsert(fw.SALConfig())])
    probes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), DenseProbe)]
    assert [node_info(n).sensitivity.layer for n in probes] == ["fc1", "fc2", "fc3", "head"]
    assert all(node_info(n).sensitivity.probe == n.target for n in probes)
    # the probe reads the layer's own parameters: names and state_dict keys unchanged
    assert [a.target for a in probes[0].args[1:]] == ["fc1.weight", "fc1.bias"]
    assert set(model.state_dict()) <= set(gm.state_dict())
    assert graph_record(gm).sensitivity.probes == tuple(sorted(n.target for n in probes))
    assert all("val" in n.meta for n in gm.graph.nodes if n.op != "output")
    torch.testing.assert_close(gm(X), model(X), rtol=0, atol=0)
