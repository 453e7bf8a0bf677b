"""Third-party model code at toy sizes, for the third-party suite and ``bench/model_coverage.py``.

Three families, each as a user would bring it to fxwormhole:

* ``transformers``: library classes built from tiny configs with random weights (nothing is
  downloaded), called as the library documents them (``model(input_ids)``, ``model(pixel_values)``),
  with their default configs except for the sizes;
* ``torchvision``: ``torchvision.models`` classification networks at small inputs (imported through
  :mod:`.torchvision_shim`);
* ``examples``: model code written here in the patterns of pytorch/examples (mnist, word_language_model,
  super_resolution, dcgan, fast_neural_style, gat) and of minGPT, plus shapes of input the library
  must cope with (a namedtuple, a tuple state, a causal mask, a second spatial size).

Every builder is deterministic (seeded under :func:`torch.random.fork_rng`, so the caller's random
stream is untouched) and returns ``(model, example_inputs)`` with the model in eval mode and
``example_inputs`` a tuple of positional arguments. :data:`MODELS` lists them by name.

This module does not import fxwormhole: it describes the models, not what the library does with them.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelSpec", "MODELS", "build", "other_size_inputs", "names"]

Inputs = tuple
Built = tuple[nn.Module, Inputs]


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the suite: how to build it and what it stands for."""

    name: str
    family: str                                  # "transformers", "torchvision" or "examples"
    build: Callable[[], Built]
    what: str                                    # one line: the pattern it exercises
    other_size: Callable[[], Inputs] | None = None  # inputs of another non-batch size the model accepts


def _seeded(fn: Callable[[], Built]) -> Callable[[], Built]:
    def build() -> Built:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, inputs = fn()
        return model.eval(), inputs
    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    return build


def _ids(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


VOCAB, BATCH, SEQ = 64, 2, 8


# ------------------------------------------------------------------------------------------------
# transformers (tiny configs, random weights)


def _gpt2(use_cache: bool | None) -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = {} if use_cache is None else {"use_cache": use_cache}
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0, **kw)
    return GPT2LMHeadModel(cfg), (_ids(BATCH, SEQ, VOCAB),)


@_seeded
def gpt2() -> Built:
    """GPT2LMHeadModel with the default config (use_cache=True): returns logits and a DynamicCache."""
    return _gpt2(None)


@_seeded
def gpt2_no_cache() -> Built:
    """GPT2LMHeadModel with use_cache=False."""
    return _gpt2(False)


@_seeded
def bert() -> Built:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg), (_ids(BATCH, SEQ, VOCAB),)


@_seeded
def t5_encoder() -> Built:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T5EncoderModel(cfg), (_ids(BATCH, SEQ, VOCAB),)


def _llama(use_cache: bool | None) -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {} if use_cache is None else {"use_cache": use_cache}
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **kw)
    return LlamaForCausalLM(cfg), (_ids(BATCH, SEQ, VOCAB),)


@_seeded
def llama() -> Built:
    """LlamaForCausalLM with the default config (use_cache=True, rotary embeddings)."""
    return _llama(None)


@_seeded
def llama_no_cache() -> Built:
    """LlamaForCausalLM with use_cache=False."""
    return _llama(False)


@_seeded
def vit() -> Built:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=16, patch_size=4, num_channels=3)
    return ViTModel(cfg, add_pooling_layer=False), (_randn(BATCH, 3, 16, 16),)


@_seeded
def rwkv() -> Built:
    from transformers import RwkvConfig, RwkvModel

    cfg = RwkvConfig(vocab_size=VOCAB, context_length=32, hidden_size=32, num_hidden_layers=2,
                     attention_hidden_size=32, intermediate_size=64)
    return RwkvModel(cfg), (_ids(BATCH, SEQ, VOCAB),)


def _mamba(use_cache: bool | None) -> Built:
    from transformers import MambaConfig, MambaModel

    kw = {} if use_cache is None else {"use_cache": use_cache}
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                      conv_kernel=4, **kw)
    return MambaModel(cfg), (_ids(BATCH, SEQ, VOCAB),)


@_seeded
def mamba() -> Built:
    """MambaModel with the default config (use_cache=True: returns a cache object)."""
    return _mamba(None)


@_seeded
def mamba_no_cache() -> Built:
    return _mamba(False)


@_seeded
def hf_resnet() -> Built:
    """transformers' ResNetModel (BatchNorm, eval mode)."""
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic")
    return ResNetModel(cfg), (_randn(BATCH, 3, 32, 32),)


# ------------------------------------------------------------------------------------------------
# torchvision (pure-Python model code; see torchvision_shim)


def _torchvision():
    from .torchvision_shim import import_torchvision

    return import_torchvision()


@_seeded
def tv_resnet18() -> Built:
    return _torchvision().models.resnet18(num_classes=10), (_randn(BATCH, 3, 32, 32),)


@_seeded
def tv_mobilenet_v3_small() -> Built:
    return _torchvision().models.mobilenet_v3_small(num_classes=10), (_randn(BATCH, 3, 32, 32),)


@_seeded
def tv_vit() -> Built:
    """torchvision's VisionTransformer at 16x16 with 4x4 patches (vit_b_16's class, tiny sizes)."""
    from_tv = _torchvision().models.vision_transformer.VisionTransformer
    model = from_tv(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                    num_classes=10)
    return model, (_randn(BATCH, 3, 16, 16),)


# ------------------------------------------------------------------------------------------------
# pytorch/examples patterns


class MnistNet(nn.Module):
    """pytorch/examples mnist/main.py ``Net`` at 12x12: conv, conv, max-pool, dropout, two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


@_seeded
def mnist_cnn() -> Built:
    return MnistNet(), (_randn(BATCH, 1, 12, 12),)


@_seeded
def mnist_cnn_batch1() -> Built:
    """The same network with a batch-1 example (what a user tracing one sample passes)."""
    return MnistNet(), (_randn(1, 1, 12, 12),)


class WordLSTM(nn.Module):
    """pytorch/examples word_language_model ``RNNModel`` (LSTM): ``forward(input, hidden)`` with
    ``input`` ``[T, B]`` token ids and ``hidden = (h0, c0)``; returns log-probs and the new state."""

    def __init__(self, ntoken: int = VOCAB, ninp: int = 16, nhid: int = 16, nlayers: int = 2) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid, self.ntoken = nlayers, nhid, ntoken

    def forward(self, input: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


@_seeded
def word_lstm() -> Built:
    model = WordLSTM()
    ids = _ids(6, 3, VOCAB).contiguous()  # [T=6, B=3]: the example's sequence-first layout
    h0, c0 = _randn(2, 3, 16, seed=2), _randn(2, 3, 16, seed=3)
    return model, (ids, (h0, c0))


class SuperResolutionNet(nn.Module):
    """pytorch/examples super_resolution ``Net``: four convs, the last to upscale^2 channels, PixelShuffle."""

    def __init__(self, upscale_factor: int = 2) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(1, 16, 5, 1, 2)
        self.conv2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.conv3 = nn.Conv2d(16, 8, 3, 1, 1)
        self.conv4 = nn.Conv2d(8, upscale_factor ** 2, 3, 1, 1)
        self.pixel_shuffle = nn.PixelShuffle(upscale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.pixel_shuffle(self.conv4(x))


@_seeded
def super_resolution() -> Built:
    return SuperResolutionNet(), (_randn(BATCH, 1, 8, 8),)


class DCGANGenerator(nn.Module):
    """pytorch/examples dcgan ``Generator``: ConvTranspose2d + BatchNorm + ReLU, Tanh, from ``[B, nz, 1, 1]``."""

    def __init__(self, nz: int = 8, ngf: int = 4, nc: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.main(input)


class DCGANDiscriminator(nn.Module):
    """pytorch/examples dcgan ``Discriminator``: strided convs, BatchNorm, LeakyReLU(0.2), Sigmoid."""

    def __init__(self, ndf: int = 4, nc: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False), nn.Sigmoid(),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.main(input).view(-1, 1).squeeze(1)


def _bn_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm running statistics, as after training (eval mode then normalises for real)."""
    g = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
    return model


@_seeded
def dcgan_generator() -> Built:
    return _bn_stats(DCGANGenerator()), (_randn(BATCH, 8, 1, 1),)


@_seeded
def dcgan_discriminator() -> Built:
    return _bn_stats(DCGANDiscriminator()), (_randn(BATCH, 3, 32, 32),)


class _ConvLayer(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.reflection_pad = nn.ReflectionPad2d(kernel // 2)
        self.conv2d = nn.Conv2d(cin, cout, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d(self.reflection_pad(x))


class _StyleResidual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _ConvLayer(channels, channels, 3, 1)
        self.in1 = nn.InstanceNorm2d(channels, affine=True)
        self.conv2 = _ConvLayer(channels, channels, 3, 1)
        self.in2 = nn.InstanceNorm2d(channels, affine=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.in1(self.conv1(x)))
        return self.in2(self.conv2(out)) + x


class _UpsampleConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, upsample: int) -> None:
        super().__init__()
        self.upsample = upsample
        self.reflection_pad = nn.ReflectionPad2d(kernel // 2)
        self.conv2d = nn.Conv2d(cin, cout, kernel, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, mode="nearest", scale_factor=self.upsample)
        return self.conv2d(self.reflection_pad(x))


class FastStyleNet(nn.Module):
    """pytorch/examples fast_neural_style ``TransformerNet`` (narrow): reflection-padded convs,
    InstanceNorm, residual blocks, nearest-upsample convs."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = _ConvLayer(3, width, 9, 1)
        self.in1 = nn.InstanceNorm2d(width, affine=True)
        self.conv2 = _ConvLayer(width, 2 * width, 3, 2)
        self.in2 = nn.InstanceNorm2d(2 * width, affine=True)
        self.res1 = _StyleResidual(2 * width)
        self.res2 = _StyleResidual(2 * width)
        self.deconv1 = _UpsampleConv(2 * width, width, 3, 2)
        self.in4 = nn.InstanceNorm2d(width, affine=True)
        self.deconv3 = _ConvLayer(width, 3, 9, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.in1(self.conv1(x)))
        y = self.relu(self.in2(self.conv2(y)))
        y = self.res2(self.res1(y))
        y = self.relu(self.in4(self.deconv1(y)))
        return self.deconv3(y)


@_seeded
def fast_neural_style() -> Built:
    return FastStyleNet(), (_randn(BATCH, 3, 16, 16),)


class GraphAttentionLayer(nn.Module):
    """pytorch/examples gat ``GraphAttentionLayer``: multi-head attention over neighbours, non-edges
    masked with ``-inf`` (``adj == 0``), LeakyReLU scores, softmax, dropout."""

    def __init__(self, in_features: int, out_features: int, n_heads: int, concat: bool = True,
                 dropout: float = 0.4, leaky_relu_slope: float = 0.2) -> None:
        super().__init__()
        self.n_heads, self.concat, self.dropout = n_heads, concat, dropout
        self.n_hidden = out_features // n_heads if concat else out_features
        self.W = nn.Parameter(torch.empty(in_features, self.n_hidden * n_heads))
        self.a = nn.Parameter(torch.empty(n_heads, 2 * self.n_hidden, 1))
        self.leakyrelu = nn.LeakyReLU(leaky_relu_slope)
        self.softmax = nn.Softmax(dim=1)
        nn.init.xavier_normal_(self.W)
        nn.init.xavier_normal_(self.a)

    def forward(self, h: torch.Tensor, adj_mat: torch.Tensor) -> torch.Tensor:
        n_nodes = h.shape[0]
        h_transformed = torch.mm(h, self.W)
        h_transformed = F.dropout(h_transformed, self.dropout, training=self.training)
        h_transformed = h_transformed.view(n_nodes, self.n_heads, self.n_hidden).permute(1, 0, 2)
        source = torch.matmul(h_transformed, self.a[:, :self.n_hidden, :])
        target = torch.matmul(h_transformed, self.a[:, self.n_hidden:, :])
        e = self.leakyrelu(source + target.mT)
        connectivity_mask = -9e16 * torch.ones_like(e)
        e = torch.where(adj_mat > 0, e, connectivity_mask)
        attention = F.softmax(e, dim=-1)
        attention = F.dropout(attention, self.dropout, training=self.training)
        h_prime = torch.matmul(attention, h_transformed)
        if self.concat:
            return h_prime.permute(1, 0, 2).contiguous().view(n_nodes, self.n_heads * self.n_hidden)
        return h_prime.mean(dim=0)


class GAT(nn.Module):
    """pytorch/examples gat ``GAT``: two attention layers, ELU between, log-softmax; inputs
    ``(node_features [N, F], adjacency [N, N])``: dim 0 is the node, not a batch."""

    def __init__(self, in_features: int = 12, n_hidden: int = 16, n_heads: int = 2, num_classes: int = 4) -> None:
        super().__init__()
        self.gat1 = GraphAttentionLayer(in_features, n_hidden, n_heads, concat=True)
        self.gat2 = GraphAttentionLayer(n_hidden, num_classes, 1, concat=False)

    def forward(self, input_tensor: torch.Tensor, adj_mat: torch.Tensor) -> torch.Tensor:
        x = F.elu(self.gat1(input_tensor, adj_mat))
        return F.log_softmax(self.gat2(x, adj_mat), dim=1)


@_seeded
def gat() -> Built:
    n = 6
    g = torch.Generator().manual_seed(5)
    adj = (torch.rand(n, n, generator=g) > 0.5).float()
    adj = ((adj + adj.T + torch.eye(n)) > 0).float()
    return GAT(), (_randn(n, 12), adj)


Batch = collections.namedtuple("Batch", ["image", "features"])


class NamedTupleNet(nn.Module):
    """A two-input model whose forward takes one ``namedtuple`` (``Batch(image, features)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.img_fc = nn.Linear(4 * 8 * 8, 16)
        self.feat_fc = nn.Linear(6, 16)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, batch: Batch) -> torch.Tensor:
        a = torch.relu(self.img_fc(torch.relu(self.conv(batch.image)).flatten(1)))
        b = torch.relu(self.feat_fc(batch.features))
        h = torch.tanh(self.fc1(torch.cat([a, b], dim=1)))
        h = torch.tanh(self.fc2(h))
        return self.head(h)


@_seeded
def namedtuple_input() -> Built:
    return NamedTupleNet(), (Batch(_randn(BATCH, 1, 8, 8), _randn(BATCH, 6, seed=2)),)


class CausalTransformer(nn.Module):
    """word_language_model's ``TransformerModel`` pattern (batch-first, float inputs): an
    ``nn.TransformerEncoder`` called with a square subsequent mask built in forward."""

    def __init__(self, d_model: int = 16, nhead: int = 2, layers: int = 2, out: int = 8) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.input = nn.Linear(d_model, d_model)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoder = nn.Linear(d_model, out)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(src.shape[1], device=src.device)
        h = self.encoder(self.input(src) * math.sqrt(src.shape[-1]), mask=mask)
        return self.decoder(h)


@_seeded
def transformer_causal() -> Built:
    return CausalTransformer(), (_randn(BATCH, SEQ, 16),)


class AnySizeCNN(nn.Module):
    """A fully convolutional classifier (adaptive pooling): any spatial size works."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


@_seeded
def any_size_cnn() -> Built:
    return AnySizeCNN(), (_randn(BATCH, 3, 12, 12),)


class LSTMCellLoop(nn.Module):
    """A Python time loop over an ``nn.LSTMCell`` (the pattern of pytorch/examples time_sequence_prediction)."""

    def __init__(self, inp: int = 4, hidden: int = 16, out: int = 3) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(inp, hidden)
        self.head = nn.Linear(hidden, out)
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        c = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


@_seeded
def lstm_cell_loop() -> Built:
    return LSTMCellLoop(), (_randn(BATCH, 5, 4),)


class NewGELU(nn.Module):
    """minGPT's GELU (the tanh approximation written out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class CausalSelfAttention(nn.Module):
    """minGPT's attention: one c_attn projection, a registered causal ``bias`` buffer, masked_fill."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, pdrop: float) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(pdrop)
        self.resid_dropout = nn.Dropout(pdrop)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MinGPTBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, pdrop: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, pdrop)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(n_embd, 4 * n_embd), c_proj=nn.Linear(4 * n_embd, n_embd),
                                      act=NewGELU(), dropout=nn.Dropout(pdrop)))
        m = self.mlp
        self.mlpf = lambda x: m.dropout(m.c_proj(m.act(m.c_fc(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlpf(self.ln_2(x))


class MinGPT(nn.Module):
    """karpathy/minGPT's ``GPT``: token + position embeddings, blocks with a causal ``bias``
    buffer, final LayerNorm, LM head; ``forward(idx, targets=None)`` returns ``(logits, loss)``."""

    def __init__(self, vocab: int = VOCAB, block_size: int = 16, n_embd: int = 32, n_head: int = 2,
                 n_layer: int = 2, pdrop: float = 0.1) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd), wpe=nn.Embedding(block_size, n_embd), drop=nn.Dropout(pdrop),
            h=nn.ModuleList(MinGPTBlock(n_embd, n_head, block_size, pdrop) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = idx.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}, block size is only {self.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


@_seeded
def mingpt() -> Built:
    return MinGPT(), (_ids(BATCH, SEQ, VOCAB),)


# ------------------------------------------------------------------------------------------------
# registry


_SPECS = [
    ModelSpec("gpt2", "transformers", gpt2, "GPT2LMHeadModel, default config (use_cache=True), Conv1D layers"),
    ModelSpec("gpt2_no_cache", "transformers", gpt2_no_cache, "GPT2LMHeadModel with use_cache=False",
              other_size=lambda: (_ids(BATCH, 12, VOCAB, seed=7),)),
    ModelSpec("bert", "transformers", bert, "BertModel: encoder, pooler, structured output",
              other_size=lambda: (_ids(BATCH, 12, VOCAB, seed=7),)),
    ModelSpec("t5_encoder", "transformers", t5_encoder, "T5EncoderModel: relative position bias, RMS norm"),
    ModelSpec("llama", "transformers", llama, "LlamaForCausalLM, default config: rotary embeddings, GQA, cache"),
    ModelSpec("llama_no_cache", "transformers", llama_no_cache, "LlamaForCausalLM with use_cache=False"),
    ModelSpec("vit", "transformers", vit, "ViTModel at 16x16, patch 4"),
    ModelSpec("rwkv", "transformers", rwkv, "RwkvModel: WKV recurrence unrolled in Python"),
    ModelSpec("mamba", "transformers", mamba, "MambaModel: selective scan (slow path), causal conv1d"),
    ModelSpec("mamba_no_cache", "transformers", mamba_no_cache, "MambaModel with use_cache=False"),
    ModelSpec("hf_resnet", "transformers", hf_resnet, "ResNetModel: BatchNorm (eval), basic blocks"),
    ModelSpec("tv_resnet18", "torchvision", tv_resnet18, "torchvision resnet18 at 32x32",
              other_size=lambda: (_randn(BATCH, 3, 48, 48, seed=7),)),
    ModelSpec("tv_mobilenet_v3_small", "torchvision", tv_mobilenet_v3_small,
              "torchvision mobilenet_v3_small at 32x32: hardswish, squeeze-excitation"),
    ModelSpec("tv_vit", "torchvision", tv_vit, "torchvision VisionTransformer at 16x16"),
    ModelSpec("mnist_cnn", "examples", mnist_cnn, "mnist Net: convs, max-pool, dropout, log-softmax"),
    ModelSpec("mnist_cnn_batch1", "examples", mnist_cnn_batch1, "mnist Net with a batch-1 example"),
    ModelSpec("word_lstm", "examples", word_lstm, "word_language_model LSTM: forward(ids [T,B], (h0, c0))"),
    ModelSpec("super_resolution", "examples", super_resolution, "super_resolution Net: PixelShuffle"),
    ModelSpec("dcgan_generator", "examples", dcgan_generator, "dcgan Generator: ConvTranspose2d, BatchNorm"),
    ModelSpec("dcgan_discriminator", "examples", dcgan_discriminator, "dcgan Discriminator: BatchNorm, LeakyReLU"),
    ModelSpec("fast_neural_style", "examples", fast_neural_style,
              "fast_neural_style TransformerNet: reflection padding, InstanceNorm, upsampling"),
    ModelSpec("gat", "examples", gat, "gat GAT: masked attention over an adjacency matrix"),
    ModelSpec("namedtuple_input", "examples", namedtuple_input, "forward(batch) with a namedtuple of two tensors"),
    ModelSpec("transformer_causal", "examples", transformer_causal,
              "nn.TransformerEncoder called with a causal mask built in forward",
              other_size=lambda: (_randn(BATCH, 12, 16, seed=7),)),
    ModelSpec("any_size_cnn", "examples", any_size_cnn, "fully convolutional CNN captured at 12x12, run at 16x16",
              other_size=lambda: (_randn(BATCH, 3, 16, 16, seed=7),)),
    ModelSpec("lstm_cell_loop", "examples", lstm_cell_loop, "Python time loop over nn.LSTMCell"),
    ModelSpec("mingpt", "examples", mingpt, "minGPT: causal bias buffer, masked_fill, GELU MLP",
              other_size=lambda: (_ids(BATCH, 12, VOCAB, seed=7),)),
]

MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def names(family: str | None = None) -> list[str]:
    """Model names in table order, optionally of one family."""
    return [s.name for s in _SPECS if family is None or s.family == family]


def build(name: str) -> Built:
    """``(model, example_inputs)`` of the named entry (a fresh, identically seeded model each call)."""
    return MODELS[name].build()


def other_size_inputs(name: str) -> Inputs | None:
    """Inputs of another non-batch size that the original model accepts, if the entry has them."""
    spec = MODELS[name]
    return spec.other_size() if spec.other_size is not None else None
