"""Explicit, per-time-step twins of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` and temporal wormholes.

``ExplicitLSTM.from_module(nn.LSTM(...))`` (likewise ``ExplicitGRU``, ``ExplicitRNN``) builds a module
with the *same* parameter names and values (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
``bias_hh_l0``, ``weight_hr_l0`` and their ``_reverse`` twins), the same call signature and the
same outputs, but whose time loop is plain Python around one small cell function per step, so
that gates are visible (:meth:`ExplicitRecurrent.step`, :meth:`ExplicitRecurrent.gate_preactivations`)
and a per-step fixed point can be put inside it (:func:`attach_temporal_runtime`; placement:
:func:`fxwormhole.passes.temporal_wormhole.add_temporal_wormhole`).

Gate order (rows of ``weight_ih`` / ``weight_hh`` / biases, as in PyTorch):

* LSTM: ``i, f, g, o``;  ``c' = σ(f)⊙c + σ(i)⊙tanh(g)``,  ``h' = σ(o)⊙tanh(c')`` (then ``W_hr h'``
  when ``proj_size > 0``).
* GRU: ``r, z, n``;  ``n = tanh(W_in x + b_in + σ(r)⊙(W_hn h + b_hn))``,  ``h' = n + σ(z)⊙(h − n)``.
* RNN: one gate ``h``;  ``h' = tanh|relu(W_ih x + b_ih + W_hh h + b_hh)``.

Execution. Without wormholes the stack runs layer by layer (as cuDNN/ATen do): the input
projection ``W_ih x + b_ih`` of a whole layer is one matmul, then a Python time loop calls the cell.
The time loop runs under ``torch.compiler.disable``, so ``torch.compile`` of a surrounding model
never unrolls T steps into one graph; :meth:`ExplicitRecurrent.compile_step` compiles the cell once
and the loop reuses it for every step, layer and sequence length.

Temporal wormholes (see docs/recurrent.md). With wormholes the stack runs time-major: at step t the
injection ``u`` into the wormholes' destination layers' inputs solves ``u* = feedback(body(u*, x_t,
s_{t-1}))``, where ``body`` runs the layer stack and returns the new states ``s_t`` and ``feedback``
returns ``gate(h_src)⊙proj(h_src)``. The step's gradient is implicit; between steps it is ordinary
back-propagation through time. The fast runtime (:mod:`fxwormhole.runtime.temporal`) runs a whole
sequence as one autograd node with hand-written VJPs; configurations it does not implement run one
:class:`~fxwormhole.runtime.fixed_point.FixedPoint` call per step (``_forward_temporal_generic``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WormholeConfig
from ..errors import ConfigError, PlacementError
from .gates import RECURRENT_LAYOUTS
from .temporal import StackPlan, TemporalRuntime, TemporalStats, fast_path_refusal
from .wormhole import Wormhole

__all__ = [
    "ExplicitRecurrent",
    "ExplicitRNN",
    "ExplicitLSTM",
    "ExplicitGRU",
    "GATE_ORDER",
    "TemporalStats",
    "explicit_from_module",
    "add_temporal_wormhole",
    "resolve_temporal_pairs",
    "attach_temporal_runtime",
    "layer_name",
]

State = Tuple[Tensor, ...]  # (h,) for RNN/GRU, (h, c) for LSTM

GATE_ORDER: Dict[str, Tuple[str, ...]] = {mode: layout.gates for mode, layout in RECURRENT_LAYOUTS.items()}


# --------------------------------------------------------------------------------------------
# Cell functions: pure tensor functions (compile-friendly); gi = W_ih x + b_ih is precomputed.
# --------------------------------------------------------------------------------------------
def _lstm_cell(gi: Tensor, state: State, w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor]) -> State:
    h, c = state
    i, f, g, o = (gi + F.linear(h, w_hh, b_hh)).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:
        h = F.linear(h, w_hr)
    return h, c


def _gru_cell(gi: Tensor, state: State, w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor]) -> State:
    (h,) = state
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (n + z * (h - n),)


def _rnn_tanh_cell(gi: Tensor, state: State, w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor]) -> State:
    return (torch.tanh(gi + F.linear(state[0], w_hh, b_hh)),)


def _rnn_relu_cell(gi: Tensor, state: State, w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor]) -> State:
    return (torch.relu(gi + F.linear(state[0], w_hh, b_hh)),)


_CELLS: Dict[str, Callable[..., State]] = {
    "LSTM": _lstm_cell,
    "GRU": _gru_cell,
    "RNN_TANH": _rnn_tanh_cell,
    "RNN_RELU": _rnn_relu_cell,
}
_GATES = {mode: len(layout.gates) for mode, layout in RECURRENT_LAYOUTS.items()}


@torch.compiler.disable
def _time_loop(cell: Callable[..., State], gi: Tensor, state: State, w_hh: Tensor, b_hh: Optional[Tensor],
               w_hr: Optional[Tensor], reverse: bool) -> Tuple[Tensor, State]:
    """Run ``cell`` over ``gi`` [T, B, G]; returns outputs [T, B, H_out] and the final state.

    Disabled for dynamo on purpose: a compiled surrounding model must not unroll T steps.
    """
    # unbind once: indexing gi[t] per step would give each step's backward a full-size zero
    # tensor (select_backward), i.e. O(T^2) memory traffic.
    gis = gi.unbind(0)
    steps = range(len(gis) - 1, -1, -1) if reverse else range(len(gis))
    outs: List[Optional[Tensor]] = [None] * len(gis)
    for t in steps:
        state = cell(gis[t], state, w_hh, b_hh, w_hr)
        outs[t] = state[0]
    return torch.stack(outs), state  # type: ignore[arg-type]


def _pad5(names: Tuple[str, ...]) -> Tuple[Optional[str], ...]:
    """Order a layer's parameter names as (w_ih, w_hh, b_ih, b_hh, w_hr), None where absent."""
    by = {n.split("_l")[0]: n for n in names}
    return tuple(by.get(k) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))


def layer_name(layer: int) -> str:
    """Name of a stack layer in wormhole pairs: ``layer0`` is the bottom layer."""
    return f"layer{layer}"


# --------------------------------------------------------------------------------------------
# The explicit module
# --------------------------------------------------------------------------------------------
class ExplicitRecurrent(nn.Module):
    """Shared base of :class:`ExplicitRNN`, :class:`ExplicitLSTM` and :class:`ExplicitGRU`.

    Args mirror ``nn.LSTM``: ``mode`` is ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``.
    Parameters are initialised as PyTorch does (``U(-1/sqrt(H), 1/sqrt(H))``).
    """

    #: what a call leaves behind besides buffers (see :attr:`FixedPoint.RUN_STATE`)
    RUN_STATE = ("_last_stats",)

    _torch_types: Tuple[type, ...] = (nn.RNNBase,)
    #: False for a module whose weights arrive with each call (:class:`~fxwormhole.runtime.cell_loop.CellLoop`)
    _owns_weights = True

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        name = type(self).__name__
        if mode not in _CELLS:
            raise ConfigError(f"{name}: mode={mode!r} is invalid: expected one of {tuple(_CELLS)}")
        for field, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}.{field}={value!r} is invalid: expected an int >= 1")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ConfigError(f"{name}.dropout={dropout!r} is invalid: expected a float in [0, 1]")
        if proj_size and mode != "LSTM":
            raise ConfigError(f"{name}.proj_size={proj_size!r} is invalid: only LSTM has a projection")
        if not isinstance(proj_size, int) or proj_size < 0 or (proj_size and proj_size >= hidden_size):
            raise ConfigError(f"{name}.proj_size={proj_size!r} is invalid: expected 0 or an int in [1, hidden_size)")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self._cell_fn: Callable[..., State] = _CELLS[mode]
        self._compiled_cell: Optional[Callable[..., State]] = None
        self._temporal: Optional[_Temporal] = None
        self._last_stats: Optional[TemporalStats] = None
        factory = {"device": device, "dtype": dtype}
        gates, h_out, dirs = _GATES[mode] * hidden_size, self.real_hidden_size, self.num_directions
        # per (layer, direction): names of (w_ih, w_hh, b_ih, b_hh, w_hr), None where absent
        self._weight_names: List[Tuple[Optional[str], ...]] = []
        for layer in range(num_layers if self._owns_weights else 0):
            in_size = input_size if layer == 0 else h_out * dirs
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                shapes = [("weight_ih" + sfx, (gates, in_size)), ("weight_hh" + sfx, (gates, h_out))]
                if bias:
                    shapes += [("bias_ih" + sfx, (gates,)), ("bias_hh" + sfx, (gates,))]
                if proj_size:
                    shapes.append(("weight_hr" + sfx, (proj_size, hidden_size)))
                for pname, shape in shapes:  # same registration order as nn.RNNBase
                    self.register_parameter(pname, nn.Parameter(torch.empty(shape, **factory)))
                self._weight_names.append(_pad5(tuple(n for n, _ in shapes)))
        self.reset_parameters()

    # ---- construction ------------------------------------------------------------------------
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def real_hidden_size(self) -> int:
        """Size of ``h`` (``proj_size`` when the LSTM has a projection)."""
        return self.proj_size or self.hidden_size

    @property
    def state_size(self) -> int:
        return 2 if self.mode == "LSTM" else 1

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.parameters(recurse=False):
                p.uniform_(-bound, bound)

    @classmethod
    def from_module(cls, module: nn.Module, *, share_parameters: bool = False) -> "ExplicitRecurrent":
        """Build the explicit twin of ``module`` (``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``).

        Parameters are copied (``share_parameters=False``, the default: the user's module is never
        touched by training the twin) or shared (the same ``nn.Parameter`` objects).
        """
        target = _explicit_class(module)
        if cls is not ExplicitRecurrent and target is not cls:
            raise PlacementError(f"{cls.__name__}.from_module got {type(module).__name__}; "
                                 f"use {target.__name__}.from_module or explicit_from_module")
        kw = dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                  bias=module.bias, batch_first=module.batch_first, dropout=float(module.dropout),
                  bidirectional=module.bidirectional)
        if target is ExplicitLSTM:
            kw["proj_size"] = module.proj_size
        if target is ExplicitRNN:
            kw["nonlinearity"] = "relu" if module.mode == "RNN_RELU" else "tanh"
        ref = next(module.parameters())
        new = target(**kw, device=ref.device, dtype=ref.dtype)
        names = [n for n, _ in new.named_parameters(recurse=False)]
        if names != list(module._flat_weights_names):
            raise PlacementError(f"{type(module).__name__} has parameters {module._flat_weights_names}, "
                                 f"expected {names}; subclasses that change the layout are not supported")
        for n in names:
            p = getattr(module, n)
            new.register_parameter(n, p if share_parameters else nn.Parameter(p.detach().clone(), p.requires_grad))
        new.train(module.training)
        return new

    def flatten_parameters(self) -> None:
        """No-op, for code that calls ``rnn.flatten_parameters()`` (cuDNN only)."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, mode={self.mode}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False), ("proj_size", 0)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        if self._temporal is not None:
            s += f", temporal_wormholes={[f'{a}->{b}' for a, b in self._temporal.pairs]}"
        return s

    # ---- per-step API ------------------------------------------------------------------------
    def _step_inputs(self) -> Tuple[Tensor, ...]:
        """Tensors the generic path passes to each step's FixedPoint after the states and masks
        (a module whose weights arrive with the call passes them here, so the implicit gradient reaches them)."""
        return ()

    def _step_weight_layout(self) -> Optional[List[Tuple[Optional[int], ...]]]:
        """Per layer, where ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` sit in :meth:`_step_inputs` (None: the
        module's own parameters)."""
        return None

    def weights(self, layer: int, direction: int = 0) -> Tuple[Optional[Tensor], ...]:
        """``(w_ih, w_hh, b_ih, b_hh, w_hr)`` of one layer/direction (``None`` where absent)."""
        names = self._weight_names[layer * self.num_directions + direction]
        return tuple(getattr(self, n) if n else None for n in names)

    def step(self, layer: int, x_t: Tensor, state: Union[Tensor, State], direction: int = 0) -> Union[Tensor, State]:
        """One time step of one layer: ``x_t`` [B, in], ``state`` h or (h, c) [B, H] -> new state.

        Uses the compiled cell after :meth:`compile_step`. Gate order: see :data:`GATE_ORDER`.
        """
        w_ih, w_hh, b_ih, b_hh, w_hr = self.weights(layer, direction)
        st = (state,) if isinstance(state, Tensor) else tuple(state)
        new = self._cell(F.linear(x_t, w_ih, b_ih), st, w_hh, b_hh, w_hr)
        return new[0] if isinstance(state, Tensor) else new

    def gate_preactivations(self, layer: int, x_t: Tensor, state: Union[Tensor, State], direction: int = 0) -> Dict[str, Tensor]:
        """Pre-activations of each gate at one step, keyed by the names in :data:`GATE_ORDER`.

        For the GRU candidate ``n`` this is ``W_in x + b_in + σ(r)⊙(W_hn h + b_hn)``.
        """
        w_ih, w_hh, b_ih, b_hh, _ = self.weights(layer, direction)
        h = state if isinstance(state, Tensor) else state[0]
        gi, gh = F.linear(x_t, w_ih, b_ih), F.linear(h, w_hh, b_hh)
        names = GATE_ORDER[self.mode]
        if self.mode == "GRU":
            (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3, -1), gh.chunk(3, -1)
            pre_r = i_r + h_r
            return {"r": pre_r, "z": i_z + h_z, "n": i_n + torch.sigmoid(pre_r) * h_n}
        return dict(zip(names, (gi + gh).chunk(len(names), -1)))

    @property
    def _cell(self) -> Callable[..., State]:
        return self._compiled_cell if self._compiled_cell is not None else self._cell_fn

    def compile_step(self, **compile_kwargs: Any) -> "ExplicitRecurrent":
        """Compile the per-step cell once with ``torch.compile(**compile_kwargs)``; returns self.

        The Python time loop stays outside the compiled graph and reuses the compiled cell for every
        step, layer and direction, so compile time does not grow with the sequence length.
        With temporal wormholes on the fast runtime, the runtime's per-sequence bulk kernels are
        compiled instead (:meth:`~fxwormhole.runtime.temporal.TemporalRuntime.compile`).
        """
        self._compiled_cell = torch.compile(self._cell_fn, **compile_kwargs)
        if self._temporal is not None:
            self._temporal.compile(compile_kwargs)
        return self

    def uncompile_step(self) -> "ExplicitRecurrent":
        """Go back to the eager cell (and the fast runtime's eager kernels)."""
        self._compiled_cell = None
        if self._temporal is not None:
            self._temporal.compile(None)
        return self

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_compiled_cell"] = None  # compiled callables do not pickle; re-run compile_step
        return state

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input: Tensor, hx: Any = None) -> Tuple[Tensor, Any]:
        """Same signature and outputs as the torch module it replaces.

        Returns ``(output, h_n)`` for RNN/GRU and ``(output, (h_n, c_n))`` for LSTM.
        """
        x, states, batched = self._prepare(input, hx)
        if self._temporal is not None:
            out, finals = self._forward_temporal(x, states)
        else:
            self._last_stats = None
            out, finals = self._forward_layers(x, states)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        h_n = torch.stack([s[0] for s in finals])
        c_n = torch.stack([s[1] for s in finals]) if self.mode == "LSTM" else None
        if not batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        return (out, (h_n, c_n)) if self.mode == "LSTM" else (out, h_n)

    def _prepare(self, input: Tensor, hx: Any) -> Tuple[Tensor, List[State], bool]:
        where = f"{type(self).__name__}({self.extra_repr()})"
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise ConfigError(f"{where}: PackedSequence input is not supported; pad it with "
                              "torch.nn.utils.rnn.pad_packed_sequence and pass the padded tensor")
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            raise ConfigError(f"{where}: expected a 2-D (unbatched) or 3-D input tensor, got "
                              f"{getattr(input, 'shape', type(input).__name__)}")
        if input.shape[-1] != self.input_size:
            raise ConfigError(f"{where}: input has {input.shape[-1]} features, expected input_size={self.input_size}")
        weight = self.weights(0, 0)[0]
        if input.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():  # torch's RNN check, as a ValueError
            raise ConfigError(f"{where}: RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                              f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        if x.shape[0] == 0:
            raise ConfigError(f"{where}: the input sequence is empty (T=0)")
        n, B = self.num_layers * self.num_directions, x.shape[1]
        sizes = [self.real_hidden_size, self.hidden_size][: self.state_size]
        if hx is None:
            parts = [x.new_zeros(n, B, s) for s in sizes]
        else:
            parts = list(hx) if self.mode == "LSTM" else [hx]
            if self.mode == "LSTM" and len(parts) != 2:
                raise ConfigError(f"{where}: LSTM initial state must be a tuple (h_0, c_0)")
            parts = [p if batched else p.unsqueeze(1) for p in parts]
            for p, s, label in zip(parts, sizes, ("h_0", "c_0")):
                if tuple(p.shape) != (n, B, s):
                    want = (n, B, s) if batched else (n, s)
                    raise ConfigError(f"{where}: {label} has shape {tuple(p.shape) if batched else tuple(p.squeeze(1).shape)}, expected {want}")
        return x, [tuple(p[k] for p in parts) for k in range(n)], batched

    def _forward_layers(self, x: Tensor, states: List[State]) -> Tuple[Tensor, List[State]]:
        """Layer-major execution (the fast path without wormholes)."""
        cell, finals, inp = self._cell, [], x
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                w_ih, w_hh, b_ih, b_hh, w_hr = self.weights(layer, d)
                gi = F.linear(inp, w_ih, b_ih)  # one matmul for the whole sequence
                seq, final = _time_loop(cell, gi, states[layer * self.num_directions + d], w_hh, b_hh, w_hr, d == 1)
                outs.append(seq)
                finals.append(final)
            inp = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                inp = F.dropout(inp, self.dropout, True)
        return inp, finals

    # ---- temporal wormholes ------------------------------------------------------------------
    @property
    def temporal_pairs(self) -> Tuple[Tuple[str, str], ...]:
        """The ``(src, dst)`` layer pairs of the temporal wormholes (empty without)."""
        return self._temporal.pairs if self._temporal is not None else ()

    @property
    def stats(self) -> Optional["TemporalStats"]:
        """Per-step, per-sample solver statistics of the last forward (``None`` without wormholes)."""
        return self._last_stats

    def _forward_temporal(self, x: Tensor, states: List[State]) -> Tuple[Tensor, List[State]]:
        """Time-major execution: one fixed-point solve per step over the whole layer stack."""
        tmp = self._temporal
        assert tmp is not None
        masks: List[Tensor] = []
        T, B, L = x.shape[0], x.shape[1], self.num_layers
        if self.dropout and self.training and L > 1:
            # Drawn up front (fixed across the iterations of a step), one [T, B, H] mask per layer
            # boundary in layer order: the same random draws as nn.LSTM's dropout under one seed.
            ones = x.new_ones(T, B, self.real_hidden_size)
            masks = [F.dropout(ones, self.dropout, True) for _ in range(L - 1)]
        fast = tmp.fast(self)
        if fast is not None:
            return self._run_fast(fast, x, states, masks)
        return self._forward_temporal_generic(x, states, masks)

    @torch.compiler.disable
    def _run_fast(self, fast: TemporalRuntime, x: Tensor, states: List[State], masks: List[Tensor]) -> Tuple[Tensor, List[State]]:
        L = self.num_layers
        h0 = torch.stack([s[0] for s in states])
        c0 = torch.stack([s[1] for s in states]) if self.mode == "LSTM" else None
        layers = [self.weights(l) for l in range(L)]
        wormholes = []
        for wh in self.temporal_wormholes.values():
            gate = wh.gate
            wormholes.append((wh.proj.map.weight, gate.logit, gate.map.map.weight if gate.kind == "input" else None))
        out, hn, cn, stats = fast.run(x, h0, c0, layers, wormholes, masks)
        self._last_stats = stats
        return out, [((hn[l], cn[l]) if cn is not None else (hn[l],)) for l in range(L)]

    def _forward_temporal_generic(self, x: Tensor, states: List[State], masks: List[Tensor]) -> Tuple[Tensor, List[State]]:
        """One :class:`FixedPoint` call per step (configurations the fast runtime does not take)."""
        tmp = self._temporal
        assert tmp is not None
        tmp.fp.train(self.training)
        tmp.body.refresh(self)
        T, B, L, S = x.shape[0], x.shape[1], self.num_layers, self.state_size
        flat = [states[l][s] for s in range(S) for l in range(L)]
        if torch.compiler.is_exporting():  # views of one [L, B, H] tensor: export's while_loop refuses aliased inputs
            flat = [s.clone() for s in flat]
        outs, per_step = [], []
        z_width = sum(tmp.dst_sizes)
        xs, ms = x.unbind(0), [m.unbind(0) for m in masks]  # unbind once (see _time_loop)
        extra = self._step_inputs()
        for t in range(T):
            # The runtime tapes each step from detached input leaves, so the step's VJP stays
            # local and the gradient w.r.t. h_{t-1} flows to the previous step by plain autograd.
            y = tmp.fp(xs[t], *flat, *[m[t] for m in ms], *extra, z0=x.new_zeros(B, z_width))
            per_step.append(tmp.fp.stats)
            flat = list(y)
            outs.append(flat[L - 1])
        self._last_stats = TemporalStats.from_steps(per_step)
        return torch.stack(outs), [tuple(flat[s * L + l] for s in range(S)) for l in range(L)]


class ExplicitLSTM(ExplicitRecurrent):
    """Explicit twin of ``nn.LSTM`` (gate order ``i, f, g, o``; ``proj_size`` supported)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: Any = None, dtype: Any = None) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)


class ExplicitGRU(ExplicitRecurrent):
    """Explicit twin of ``nn.GRU`` (gate order ``r, z, n``)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)


class ExplicitRNN(ExplicitRecurrent):
    """Explicit twin of ``nn.RNN`` (``nonlinearity`` ``"tanh"`` or ``"relu"``)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device: Any = None, dtype: Any = None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ConfigError(f"ExplicitRNN.nonlinearity={nonlinearity!r} is invalid: expected 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size,
                         num_layers, bias, batch_first, dropout, bidirectional, 0, device, dtype)


def _explicit_class(module: nn.Module) -> type:
    if isinstance(module, nn.LSTM):
        return ExplicitLSTM
    if isinstance(module, nn.GRU):
        return ExplicitGRU
    if isinstance(module, nn.RNN):
        return ExplicitRNN
    raise PlacementError(f"cannot make an explicit recurrent module from {type(module).__name__}: "
                         "expected torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU")


def explicit_from_module(module: nn.Module, *, share_parameters: bool = False) -> ExplicitRecurrent:
    """The explicit twin of an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (see :meth:`ExplicitRecurrent.from_module`)."""
    return ExplicitRecurrent.from_module(module, share_parameters=share_parameters)


# --------------------------------------------------------------------------------------------
# Temporal wormholes
# --------------------------------------------------------------------------------------------
class _StackBody(nn.Module):
    """``body(u, x_t, h_0..h_{L-1}[, c_0..c_{L-1}][, masks][, weights]) -> new states``: one step of the stack.

    Registers the recurrent module's parameters (the same ``nn.Parameter`` objects) so that the
    fixed-point runtime sees them as this body's parameters; it is kept out of the recurrent
    module's own module tree (no cycle, no duplicate state_dict keys). A module whose weights
    arrive with the call (a fused cell loop) passes them as the last inputs instead
    (``rnn._step_weight_layout()`` says where each one sits).
    """

    def __init__(self, rnn: ExplicitRecurrent, dst_layers: Sequence[int], dst_sizes: Sequence[int]) -> None:
        super().__init__()
        self.mode, self.num_layers, self.state_size = rnn.mode, rnn.num_layers, rnn.state_size
        self.dst_layers, self.dst_sizes = tuple(dst_layers), tuple(dst_sizes)
        self._names = list(rnn._weight_names)  # unidirectional: one entry per layer
        self._layout = rnn._step_weight_layout()
        self._n_weights = 0 if self._layout is None else sum(i is not None for l in self._layout for i in l)
        self.refresh(rnn)
        object.__setattr__(self, "_rnn", rnn)  # unregistered: for its (possibly compiled) cell

    def refresh(self, rnn: ExplicitRecurrent) -> None:
        """Re-register ``rnn``'s parameters (cheap; follows parameters replaced since construction)."""
        for name, p in rnn.named_parameters(recurse=False):
            if self._parameters.get(name) is not p:
                self.register_parameter(name, p)

    def forward(self, u: Tensor, x_t: Tensor, *rest: Tensor) -> Tuple[Tensor, ...]:
        L, S = self.num_layers, self.state_size
        weights = rest[len(rest) - self._n_weights:] if self._n_weights else ()
        flat, masks = rest[: L * S], rest[L * S: len(rest) - self._n_weights]
        inject: Dict[int, Tensor] = {}
        for layer, part in zip(self.dst_layers, u.split(self.dst_sizes, -1)):
            inject[layer] = inject[layer] + part if layer in inject else part
        cell, inp, new = self._rnn._cell, x_t, []
        for layer in range(L):
            if layer in inject:
                inp = inp + inject[layer]
            if self._layout is None:
                w = [getattr(self, n) if n else None for n in self._names[layer]]
            else:
                w = [None if i is None else weights[i] for i in self._layout[layer]]
            st = cell(F.linear(inp, w[0], w[2]), tuple(flat[s * L + layer] for s in range(S)), w[1], w[3], w[4])
            new.append(st)
            inp = st[0] * masks[layer] if masks and layer < L - 1 else st[0]
        return tuple(new[layer][s] for s in range(S) for layer in range(L))


class _WormholeFeedback(nn.Module):
    """``feedback(y, x_t, ...) -> (concat_k gate_k(h_src_k) ⊙ proj_k(h_src_k), scale)``.

    ``scale`` is the per-sample norm of layer ``scale_input``'s input: ``||x_t||`` (0, explicit modules),
    or the lower layer's new ``h`` (a fused cell loop whose wormhole ends above the bottom cell, as the
    fixed point of the unrolled loop measures it).
    """

    def __init__(self, wormholes: nn.ModuleDict, src_layers: Sequence[int], scale_input: int = 0) -> None:
        super().__init__()
        self.wormholes, self.src_layers, self.scale_input = wormholes, tuple(src_layers), scale_input

    def forward(self, y: Tuple[Tensor, ...], x_t: Tensor, *rest: Tensor) -> Tuple[Tensor, Tensor]:
        parts = [wh(y[src]) for wh, src in zip(self.wormholes.values(), self.src_layers)]
        z = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        ref = x_t if self.scale_input == 0 else y[self.scale_input - 1]  # y[l] is layer l's new h
        return z, torch.linalg.vector_norm(ref, dim=-1)


class _Temporal:
    """Plain holder (not an nn.Module) of the per-step fixed point: keeps it out of the module tree.

    ``runtime`` chooses the execution: ``"auto"`` (the fast :class:`~fxwormhole.runtime.temporal.
    TemporalRuntime` when the configuration fits, see :func:`~fxwormhole.runtime.temporal.
    fast_path_refusal`, else one ``FixedPoint`` call per step), ``"fast"`` or ``"generic"``.
    """

    def __init__(self, pairs: Tuple[Tuple[str, str], ...], fp: nn.Module, body: _StackBody, dst_sizes: Sequence[int],
                 region_only: bool = False) -> None:
        self.pairs, self.fp, self.body, self.dst_sizes = pairs, fp, body, tuple(dst_sizes)
        self.region_only = region_only
        self.runtime = "auto"
        self._fast: Optional[TemporalRuntime] = None
        self._compile_kwargs: Optional[dict] = None
        self.refusal = fast_path_refusal(fp.solver_config, fp.grad_config)

    def compile(self, kwargs: Optional[dict]) -> None:
        """Compile (``kwargs``: torch.compile's) or uncompile (None) the fast runtime's kernels."""
        self._compile_kwargs = None if kwargs is None else dict(kwargs)
        if self._fast is not None:
            self._fast.uncompile() if kwargs is None else self._fast.compile(**kwargs)

    def fast(self, rnn: "ExplicitRecurrent") -> Optional[TemporalRuntime]:
        """The fast runtime for ``rnn``, or None when this call must take the generic path.

        ``torch.export`` always takes the generic path: its per-step ``FixedPoint`` exports as a
        ``while_loop``, whereas the fast runtime reads the device (which export cannot trace)."""
        if self.runtime == "generic" or torch.compiler.is_exporting() or (
                self.runtime == "auto" and (self.refusal or torch.is_autocast_enabled())):
            return None
        if self.refusal:
            raise ConfigError(f"{self.fp.name}: runtime='fast' is impossible: {self.refusal}")
        if self._fast is None:
            whs = list(rnn.temporal_wormholes.values())
            plan = StackPlan(rnn.mode, rnn.num_layers, rnn.input_size, rnn.hidden_size, rnn.proj_size,
                             tuple((int(a[5:]), int(b[5:])) for a, b in self.pairs),
                             tuple(wh.gate.kind for wh in whs), tuple(float(wh.gate.cap) for wh in whs),
                             region_only=getattr(self, "region_only", False))
            self._fast = TemporalRuntime(plan, self.fp.solver_config, self.fp.grad_config, self.fp.on_fail, self.fp.name)
            if self._compile_kwargs is not None:
                self._fast.compile(**self._compile_kwargs)
        return self._fast

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fast"] = None  # rebuilt on first use (holds per-sequence hints only)
        state["_compile_kwargs"] = None  # compiled kernels do not pickle; call compile_step() again
        return state


def attach_temporal_runtime(rnn: ExplicitRecurrent, pairs: Sequence[Tuple[int, int]], wormholes: Sequence[Wormhole],
                            config: WormholeConfig, *, where: str = "", region_only: bool = False) -> None:
    """Give ``rnn`` (in place) the runtime of temporal wormholes: ``pairs[k] = (src_layer, dst_layer)``
    carried by ``wormholes[k]`` (``[1, H] -> [1, size of dst_layer's input]``), one fixed point per step.

    ``region_only``: each step's fixed point spans the looped layers only, as in an unrolled cell loop
    (see :class:`~fxwormhole.runtime.temporal.StackPlan`); explicit modules keep the default.

    Placement (which pairs, validation, building the wormholes from the config) is the placement
    passes' job: :func:`fxwormhole.passes.temporal_wormhole.add_temporal_wormhole` and
    :class:`fxwormhole.passes.cell_loops.FuseCellLoops`.
    """
    from .fixed_point import FixedPoint  # imported here: the runtime is optional until used

    idx = tuple(pairs)
    dst_sizes = [int(w.dst_shape[-1]) for w in wormholes]
    rnn.temporal_wormholes = nn.ModuleDict({f"{layer_name(a)}_to_{layer_name(b)}": w for (a, b), w in zip(idx, wormholes)})
    body = _StackBody(rnn, [b for _, b in idx], dst_sizes)
    feedback = _WormholeFeedback(rnn.temporal_wormholes, [a for a, _ in idx], min(b for _, b in idx) if region_only else 0)
    # the weights a fused cell loop passes per step are not batched (whatever their first dim)
    n_weights = body._n_weights
    batched = None if not n_weights else (True,) * (1 + rnn.num_layers * rnn.state_size) + (False,) * n_weights
    fp = FixedPoint(body, feedback, solver=config.solver, grad=config.grad, on_fail=config.on_fail,
                    name=f"temporal:{where or type(rnn).__name__}", batched=batched)
    rnn._temporal = _Temporal(tuple((layer_name(a), layer_name(b)) for a, b in idx), fp, body, dst_sizes, region_only)


def __getattr__(name: str) -> Any:
    # Placement moved to the temporal pass; these public names stay importable from here.
    if name in ("add_temporal_wormhole", "resolve_temporal_pairs"):
        from ..passes import temporal_wormhole

        return getattr(temporal_wormhole, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
