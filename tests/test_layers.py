"""Layer recognition by what a layer computes (issue 16 class 2), on both front ends, and the
"auto" policy on models whose first candidate span cannot be placed.

Plain-PyTorch mimics of the third-party patterns: transformers' ``Conv1D`` (``addmm`` against a
``[in, out]`` weight), a hand-written ``x @ W + b`` layer, pytorch/examples' DCGAN generator
(``ConvTranspose2d``) and GAT (``torch.mm(h, self.W)`` inside an attention module), an
``nn.LSTMCell`` Python loop, a ViT-like model whose deepest unit is a sequence and whose first
layer a patch convolution, and an RWKV-like recurrence filling a buffer in place.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxwormhole as fw
from fxwormhole import analysis
from fxwormhole.errors import PlacementError
from fxwormhole.layer_ops import matmul_form

pytestmark = pytest.mark.usefixtures("one_thread")


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, verbatim: a linear layer with a transposed weight."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class MatMulLayer(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.W + self.b


class GPTMLP(nn.Module):
    """GPT-2's MLP pattern with Conv1D layers, then a hand-written matmul layer."""

    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(16, 8)
        self.c_proj = Conv1D(8, 16)
        self.mix = MatMulLayer(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.c_fc(x))
        h = torch.tanh(self.c_proj(h))
        h = torch.tanh(self.mix(h))
        return self.head(h)


class Generator(nn.Module):
    """pytorch/examples dcgan Generator pattern: ConvTranspose + BatchNorm + ReLU."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(6, 8, 4, 1, 0, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 4, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.ConvTranspose2d(4, 4, 3, 2, 1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(4, 3, 3, 1, 1), nn.Tanh())

    def forward(self, z):
        return self.main(z)


class GraphAttention(nn.Module):
    """pytorch/examples gat GraphAttentionLayer, one head: ``torch.mm(h, self.W)`` and a mask."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.a = nn.Parameter(torch.randn(2 * n_out, 1) * 0.3)
        self.n_out = n_out

    def forward(self, h, adj):
        wh = torch.mm(h, self.W)
        e = F.leaky_relu(wh @ self.a[: self.n_out] + (wh @ self.a[self.n_out:]).T, 0.2)
        e = torch.where(adj > 0, e, torch.full_like(e, -9e15))
        return torch.softmax(e, dim=1) @ wh


class GAT(nn.Module):
    def __init__(self):
        super().__init__()
        self.gat1 = GraphAttention(5, 8)
        self.gat2 = GraphAttention(8, 3)

    def forward(self, x, adj):
        return F.log_softmax(self.gat2(F.elu(self.gat1(x, adj)), adj), dim=1)


def _gat_inputs():
    g = torch.Generator().manual_seed(3)
    adj = ((torch.rand(6, 6, generator=g) > 0.5).float() + torch.eye(6)).clamp(max=1)
    return torch.randn(6, 5, generator=g), adj


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# recognition


def test_matmul_form_reads_what_the_forward_computes():
    assert matmul_form(Conv1D(4, 3)).out_dim == 1 and matmul_form(Conv1D(4, 3)).bias == "bias"
    assert matmul_form(MatMulLayer(3, 4)) == matmul_form(MatMulLayer(3, 4))
    assert matmul_form(MatMulLayer(3, 4)).weight == "W"

    class LinearT(nn.Module):  # x @ W.T: the neurons are the rows, as nn.Linear's
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.weight.t()

    class NotALayer(nn.Module):  # an activation inside: not one matrix product
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return torch.relu(x @ self.weight)

    class TwoProducts(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return x @ self.weight @ self.weight

    assert matmul_form(LinearT()).out_dim == 0
    assert matmul_form(NotALayer()) is None and matmul_form(TwoProducts()) is None
    assert matmul_form(nn.Linear(2, 2)) is None  # torch's own layers have kinds of their own


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_conv1d_and_matmul_layers_are_layers(front_end):
    model = GPTMLP()
    x = torch.randn(2, 5, 8)
    gm = fw.capture(model, (x,), front_end=front_end)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    layers = analysis.layer_table(gm)
    assert [(l.name, l.kind, l.out_dim, l.weight) for l in layers] == [
        ("c_fc", "matmul", 1, "c_fc.weight"), ("c_proj", "matmul", 1, "c_proj.weight"),
        ("mix", "matmul", 1, "mix.W"), ("head", "linear", 0, "head.weight")]
    assert [l.depth for l in layers] == [0, 1, 2, 3] and layers[-1].is_output_layer
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
    assert calls == ["c_fc", "c_proj", "mix", "head"]  # one node per layer call, on both front ends
    assert set(gm.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_transposed_convolutions_are_layers(front_end):
    model = Generator().eval()
    z = torch.randn(2, 6, 1, 1)
    gm = fw.capture(model, (z,), front_end=front_end)
    torch.testing.assert_close(gm(z), model(z), rtol=0, atol=0)
    layers = analysis.layer_table(gm)
    assert [(l.name, l.kind, l.out_dim) for l in layers] == [
        ("main.0", "conv_transpose2d", 1), ("main.3", "conv_transpose2d", 1), ("main.6", "conv_transpose2d", 1),
        ("main.8", "conv_transpose2d", 1)]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and "main.0" == n.target]  # normalised


@pytest.mark.parametrize("nd", [1, 3])
def test_transposed_convolutions_of_every_rank_normalise(nd):
    conv = {1: nn.ConvTranspose1d, 3: nn.ConvTranspose3d}[nd]
    model = nn.Sequential(conv(3, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(), conv(4, 2, 2))
    x = torch.randn(2, 3, *([4] * nd))
    gm = fw.capture(model, (x,), front_end="export")
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert [l.kind for l in analysis.layer_table(gm)] == [f"conv_transpose{nd}d"] * 2
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"] == ["0", "1", "2"][::2]


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_a_product_against_a_parameter_inside_a_module_is_a_layer(front_end):
    model = GAT()
    x, adj = _gat_inputs()
    gm = fw.capture(model, (x, adj), front_end=front_end)
    layers = analysis.layer_table(gm)
    assert [(l.name, l.kind, l.out_dim, l.module_type) for l in layers] == [
        ("gat1.W", "matmul", 1, "Parameter"), ("gat2.W", "matmul", 1, "Parameter")]
    assert layers[0].input_node == "x" and layers[0].in_shape == (6, 5) and layers[0].out_shape == (6, 8)
    assert not layers[0].is_output_layer  # reading x.shape is not reading the layer's output


def test_torch_modules_keep_their_layers():
    """nn.MultiheadAttention's packed in_proj is MultiheadAttention's business: its layer is out_proj."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    gm = fw.capture(nn.Sequential(layer, nn.Linear(8, 2)), (torch.randn(2, 3, 8),), front_end="export")
    assert [l.name for l in analysis.layer_table(gm)] == ["0.self_attn.out_proj", "0.linear1", "0.linear2", "1"]


# ------------------------------------------------------------------------------------------------
# "auto": the first candidate that can be placed, and submodule boundaries as a fall-back


@pytest.mark.parametrize("name,build,inputs", [
    ("gpt_mlp", GPTMLP, lambda: (torch.randn(2, 5, 8),)),
    ("dcgan_generator", Generator, lambda: (torch.randn(2, 6, 1, 1),)),
])
def test_auto_places_wormholes_on_recognised_layers(name, build, inputs):
    model, args = build().eval(), inputs()
    net = fw.transform(model, args)
    assert len(net.wormholes) == 1
    layers = {l.name for l in analysis.layer_table(fw.capture(model, args))}
    assert {net.wormholes[0].src, net.wormholes[0].dst} <= layers
    _close(net(*args), model(*args))
    open_net = fw.transform(model, args, fw.WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.1))
    assert not torch.allclose(open_net(*args), model(*args))  # the wormhole is really there


def test_gat_falls_back_to_module_boundaries():
    """Two attention layers, one hidden matrix product: no layer span; the blocks are the span."""
    model = GAT()
    args = _gat_inputs()
    net = fw.transform(model, args)
    assert [(w.src, w.dst) for w in net.wormholes] == [("gat2", "gat1")]
    _close(net(*args), model(*args))


class ViTLike(nn.Module):
    """torchvision VisionTransformer's shape: patch conv, then a sequence encoder: the deepest unit
    (a sequence) cannot be bridged back onto the first layer's input (an image)."""

    def __init__(self):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 8, 4, 4)
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.conv_proj(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(h)[:, 0])


def test_auto_takes_the_first_candidate_that_can_be_placed():
    model, x = ViTLike(), torch.randn(2, 3, 8, 8)
    gm = fw.capture(model, (x,))
    first = analysis.candidate_spans(gm)[0]
    with pytest.raises(PlacementError, match="cannot bridge"):
        fw.transform(model, (x,), fw.WormholeConfig(wormholes=[first]))
    net = fw.transform(model, (x,))
    assert [(w.src, w.dst) for w in net.wormholes] != [first] and len(net.wormholes) == 1
    _close(net(x), model(x))


class Accumulates(nn.Module):
    """A buffer allocated outside a span and updated in place inside it (RWKV's WKV state)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        acc = torch.zeros_like(x)
        acc = acc.add_(torch.tanh(self.a(x)))
        h = torch.tanh(self.c(torch.tanh(self.b(acc))))
        return self.head(h)


def test_auto_skips_a_span_whose_cycle_would_repeat_an_in_place_update(monkeypatch):
    model, x = Accumulates(), torch.randn(2, 4)
    with pytest.raises(PlacementError, match="in place"):
        fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("c", "a")]))
    real = analysis.candidate_spans
    monkeypatch.setattr(analysis, "candidate_spans", lambda gm, layers=None: [("c", "a"), *real(gm, layers)])
    net = fw.transform(model, (x,))
    assert [(w.src, w.dst) for w in net.wormholes] == [real(fw.capture(model, (x,)))[0]]
    _close(net(x), model(x))


class CellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(3, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], 6)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def test_auto_on_a_cell_loop_feeds_each_steps_h_back():
    model, x = CellLoop(), torch.randn(2, 4, 3)
    layers = analysis.layer_table(fw.capture(model, (x,)))
    assert all(l.out_shape == (2, 6) for l in layers if l.kind == "lstm_cell")  # h, not (h, c)
    # the cell-loop pass fuses the loop (one CellLoop on the temporal runtime); without it, "auto"
    # places one wormhole per time step, each step's h back into its input
    from fxwormhole.runtime.cell_loop import CellLoop as FusedLoop
    from helpers import transform_unfused

    net = fw.transform(model, (x,))
    assert len([m for m in net.modules() if isinstance(m, FusedLoop)]) == 1
    _close(net(x), model(x))
    unfused = transform_unfused(model, (x,), fw.WormholeConfig())
    assert len(unfused.fixed_point_modules()) == 4
    _close(unfused(x), model(x))


# ------------------------------------------------------------------------------------------------
# hints name what the model has


def test_auto_refusal_names_the_models_own_layers():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises(PlacementError) as info:
        fw.transform(model, (torch.randn(2, 4),))
    msg = str(info.value)
    assert "'fc2'" not in msg and "'0'" in msg


def test_instrument_says_bare_layer_only_for_a_bare_layer():
    with pytest.raises(PlacementError, match="bare Linear layer"):
        fw.instrument(nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(PlacementError) as info:
        fw.instrument(Generator().eval(), (torch.randn(2, 6, 1, 1),))
    assert "bare" not in str(info.value) and "'main.0' (conv_transpose2d)" in str(info.value)
    with pytest.raises(PlacementError) as info:
        fw.instrument(nn.Sequential(nn.Tanh()), (torch.randn(2, 4),))
    assert "bare" not in str(info.value) and "holds no neuron layer" in str(info.value)
