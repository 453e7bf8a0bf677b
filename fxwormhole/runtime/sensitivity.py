"""Sensitivity probes and SAL (sensitivity adjustment learning), as runtime modules.

A neuron ``j`` with input weights ``w_j`` (bias excluded), pre-activation ``U_j = w_j . x + theta_j``
and output ``f(U_j)`` has sensitivity ``s_j = f'(U_j) ||w_j||_2`` (Shibata et al. 2021). Each probe
keeps, per neuron, an exponential moving average ``s_bar`` (buffer, carried by ``state_dict``) and
the layer's log RMS sensitivity. Statistics are updated in training mode only, with in-place buffer
writes that torch.compile traces (no Python side effects).

SAL adds ``-eta * g_j * d s_j / d(w_j, theta_j)`` to the parameters' ``.grad`` during the ordinary
``loss.backward()``, so every torch optimizer takes it with the task gradient at each step:

* ``g_j = [s_bar_j < target]`` (one-sided, default) or ``sign(target - s_bar_j)`` (two-sided),
  decided from ``s_bar`` as it was before the current forward;
* ``d s/d w_j = f'(U) w_j/||w_j|| + ||w_j|| f''(U) x`` and ``d s/d theta_j = ||w_j|| f''(U)``, or, in the
  log form, ``d log s/d w_j = w_j/||w_j||^2 + (f''/f')(U) x`` and ``d log s/d theta_j = (f''/f')(U)``;
* averaged over the batch, time steps and positions; ``x`` is the layer input, treated as a
  constant (the rule is local: nothing flows into earlier layers).

Dense layers (Linear, Conv1d/2d/3d): the probe runs the layer op itself (same functional call as
the module, so outputs are identical) inside :class:`_SALDense`, whose backward folds the SAL
``x``-term into the weight-gradient product: ``dW = (G + c * f''(U))^T x`` costs no extra matmul.

Recurrent modules (RNN/LSTM/GRU and their cells): the module runs unchanged; the probe recomputes
every gate neuron's pre-activation from the module's weights, the step input and the previous
hidden state, and hands the SAL gradients to :class:`_InjectGrads`, an identity on the module's
outputs whose backward adds them to the weights' gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..config import SALConfig
from ..passes.activations import Derivatives
from .gates import RECURRENT_LAYOUTS

__all__ = ["NeuronProbe", "DenseProbe", "RecurrentProbe", "probes_of", "GATES"]

# Gate layout of torch's recurrent modules (rows of weight_ih / weight_hh) and each gate's activation.
GATES: Dict[str, Tuple[str, ...]] = {l.kind: l.activations for l in RECURRENT_LAYOUTS.values() if l.kind != "rnn"}
_EPS = 1e-12


@dataclass(frozen=True)
class _Rule:
    """The static part of the SAL rule a probe applies (Python constants: torch.compile guards them)."""

    eta: float
    target: float
    two_sided: bool
    log_form: bool
    recurrent_only: bool
    enabled: bool
    n_calls: int

    @classmethod
    def of(cls, cfg: SALConfig, n_calls: int) -> "_Rule":
        return cls(float(cfg.eta), float(cfg.target), cfg.two_sided, cfg.log_form, cfg.recurrent_only,
                   cfg.enabled and cfg.eta > 0, max(1, int(n_calls)))


def _row_coefficients(rule: _Rule, gate: Tensor, norm: Tensor, mean_d1: Tensor, frac_active: Optional[Tensor],
                      n: int) -> Tuple[Tensor, Tensor]:
    """Per-neuron factors of the SAL gradient (already negated: they are added to ``.grad``).

    Returns ``(c_u, c_w)``: the ``x``-term is ``sum_b c_u[j] * E[b, j] * x_b`` with ``E = f''`` (plain)
    or ``f''/f'`` (log form); the norm term is ``c_w[j] * w_j``.
    """
    scale = -rule.eta * gate / rule.n_calls
    if rule.log_form:
        assert frac_active is not None
        return scale / n, scale * frac_active / norm.square()
    return scale * norm / n, scale * mean_d1 / norm


def _neuron_stats(d1: Tensor, norm: Tensor, dim: int, need_frac: bool = False
                  ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Mean ``s`` per neuron, mean ``s^2`` over the layer, mean ``f'`` and (if asked) share of
    ``f' != 0`` per neuron. ``||w_j||`` is constant per neuron, so only ``f'`` is reduced."""
    dims = [i for i in range(d1.dim()) if i != dim]
    n = d1.numel() // d1.shape[dim]
    mean_d1 = d1.mean(dims)
    mean_d1_sq = d1.square().mean(dims)
    frac = (d1 != 0).sum(dims).to(d1.dtype) / n if need_frac else None
    return norm * mean_d1, (norm.square() * mean_d1_sq).mean(), mean_d1, frac


# ------------------------------------------------------------------------------ dense layers
@dataclass(frozen=True)
class _DenseSpec:
    """Static description of a dense layer op (linear or convolution with zero padding)."""

    kind: str  # "linear" | "conv1d" | "conv2d" | "conv3d"
    act: Derivatives
    rule: _Rule
    stride: Tuple[int, ...] = ()
    padding: Any = ()
    dilation: Tuple[int, ...] = ()
    groups: int = 1

    def op(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.kind]
        return conv(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    @property
    def channel_dim(self) -> int:
        return -1 if self.kind == "linear" else 1

    def backward(self, x: Tensor, w: Tensor, g: Tensor, g_aug: Tensor, has_bias: bool):
        """Input gradient from the task gradient ``g``; weight/bias gradients from ``g_aug``."""
        if self.kind == "linear":
            n_out = w.shape[0]
            gx = g.matmul(w)
            g2 = g_aug.reshape(-1, n_out)
            gw = g2.t().mm(x.reshape(-1, x.shape[-1]))
            return gx, gw, (g2.sum(0) if has_bias else None)
        nd = int(self.kind[4])
        common = (self.stride, self.padding, self.dilation, False, [0] * nd, self.groups)
        bias_sizes = [w.shape[0]] if has_bias else None
        gx = torch.ops.aten.convolution_backward(g, x, w, bias_sizes, *common, [True, False, False])[0]
        _, gw, gb = torch.ops.aten.convolution_backward(g_aug, x, w, bias_sizes, *common, [False, True, has_bias])
        return gx, gw, gb


class _SALDense(torch.autograd.Function):
    """Dense layer op whose weight gradient carries the SAL term (input gradient unchanged).

    Returns ``(U, mean_s per neuron, mean s^2)``; the two statistics are not differentiable.
    """

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Optional[Tensor], gate: Tensor, spec: _DenseSpec):
        u = spec.op(x, w, b)
        with torch.no_grad():
            norm = w.detach().flatten(1).norm(dim=1).clamp_min(_EPS)
            if spec.rule.log_form:
                d1, e = spec.act.d1(u), spec.act.ratio(u)
            else:
                d1, e = spec.act.first_and_second(u)
            mean_s, mean_s2, mean_d1, frac = _neuron_stats(d1, norm, spec.channel_dim % u.dim(), spec.rule.log_form)
            n = u.numel() // u.shape[spec.channel_dim]
            c_u, c_w = _row_coefficients(spec.rule, gate, norm, mean_d1, frac, n)
        return u, mean_s, mean_s2, e, c_u, c_w

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, _, spec = inputs
        _, _, _, e, c_u, c_w = output
        ctx.spec, ctx.has_bias = spec, b is not None
        ctx.save_for_backward(x, w, e, c_u, c_w)
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, g, *unused):
        x, w, e, c_u, c_w = ctx.saved_tensors
        # Under autocast the op ran in bf16/fp16 but this backward runs outside autocast: compute
        # it in the weight's dtype (autograd casts the input gradient back to the input's dtype).
        g, e, x = g.to(w.dtype), e.to(w.dtype), x.to(w.dtype)
        spec: _DenseSpec = ctx.spec
        shape = [1] * e.dim()
        shape[spec.channel_dim] = -1
        g_aug = torch.addcmul(g, e, c_u.view(shape))
        gx, gw, gb = spec.backward(x, w, g, g_aug, ctx.has_bias)
        gw = gw.addcmul_(c_w.view([-1] + [1] * (w.dim() - 1)), w)
        return gx, gw, gb, None, None


class NeuronProbe(nn.Module):
    """Common state of a probe: per-neuron ``s_bar``, the layer's log RMS sensitivity, the SAL rule.

    Buffers (persistent, in ``state_dict``): ``s_bar`` ``[N]``, ``log_rms`` (EMA of the per-batch
    log RMS sensitivity), ``last_log_rms`` and ``count`` (number of statistic updates).
    """

    def __init__(self, layer: str, kind: str, neurons: int, activation: str, source: str, sal: SALConfig,
                 n_calls: int = 1, dtype: Optional[torch.dtype] = None):
        super().__init__()
        dtype = dtype if dtype is not None and dtype.is_floating_point else torch.get_default_dtype()
        self.layer, self.kind, self.activation, self.source = layer, kind, activation, source
        self.beta = float(sal.beta)
        self.rule = _Rule.of(sal, n_calls)
        # Statistics in the layer's dtype (a float32 gate would round a float64 model's SAL step).
        self.register_buffer("s_bar", torch.zeros(neurons, dtype=dtype))
        self.register_buffer("log_rms", torch.zeros((), dtype=dtype))
        self.register_buffer("last_log_rms", torch.zeros((), dtype=dtype))
        self.register_buffer("count", torch.zeros((), dtype=dtype))

    @property
    def neurons(self) -> int:
        return self.s_bar.numel()

    def sal_active(self) -> bool:
        return self.training and self.rule.enabled and torch.is_grad_enabled()

    def gate(self) -> Tensor:
        """SAL gate per neuron from the current ``s_bar`` (all open before the first update)."""
        with torch.no_grad():
            if self.rule.two_sided:
                g = torch.sign(self.rule.target - self.s_bar)
            else:
                g = (self.s_bar < self.rule.target).to(self.s_bar.dtype)
            return torch.where(self.count > 0, g, torch.ones_like(g))

    def update_stats(self, mean_s: Tensor, mean_s2: Tensor) -> None:
        """EMA update (the first update copies the batch value: no bias toward the zero init)."""
        with torch.no_grad():
            first = self.count == 0
            b = self.beta
            mean_s = mean_s.to(self.s_bar.dtype)
            lr = 0.5 * torch.log(mean_s2.to(self.s_bar.dtype).clamp_min(1e-30))
            self.s_bar.copy_(torch.where(first, mean_s, b * self.s_bar + (1 - b) * mean_s))
            self.log_rms.copy_(torch.where(first, lr, b * self.log_rms + (1 - b) * lr))
            self.last_log_rms.copy_(lr)
            self.count.add_(1)

    def zero_stats(self) -> None:
        """Forget all statistics (the next update starts the averages afresh)."""
        for buf in (self.s_bar, self.log_rms, self.last_log_rms, self.count):
            buf.zero_()

    def extra_repr(self) -> str:
        r = self.rule
        return (f"layer={self.layer!r}, kind={self.kind}, neurons={self.neurons}, activation={self.activation} "
                f"({self.source}), sal={'on' if r.enabled else 'off'}, eta={r.eta}, target={r.target}, "
                f"two_sided={r.two_sided}, log_form={r.log_form}, calls={r.n_calls}")


class DenseProbe(NeuronProbe):
    """Runs a Linear/ConvNd layer (``forward(x, weight, bias) -> U``), measures it and applies SAL.

    Replaces the layer's ``call_module`` node; the layer's parameters stay where they were (the graph
    reads them with ``get_attr``), so ``state_dict`` keys are unchanged.
    """

    def __init__(self, layer: str, module: nn.Module, kind: str, act: Derivatives, activation: str,
                 sal: SALConfig, n_calls: int = 1):
        super().__init__(layer, kind, module.weight.shape[0], activation, act.source, sal, n_calls,
                         module.weight.dtype)
        self.pre_pad: Optional[Tuple[Tuple[int, ...], str]] = None
        if kind == "linear":
            self.spec = _DenseSpec(kind, act, self.rule)
            return
        padding = module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):
            # As nn.ConvNd._conv_forward: pad explicitly, then convolve without padding.
            pads = tuple(module._reversed_padding_repeated_twice)
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            self.pre_pad = (pads, mode) if any(pads) else None
            padding = (0,) * len(module.kernel_size)
        self.spec = _DenseSpec(kind, act, self.rule, tuple(module.stride), tuple(padding),
                               tuple(module.dilation), module.groups)

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad[0], mode=self.pre_pad[1])
        if self.sal_active():
            u, mean_s, mean_s2, *_ = _SALDense.apply(x, weight, bias, self.gate().to(weight.dtype), self.spec)
            self.update_stats(mean_s, mean_s2)
            return u
        u = self.spec.op(x, weight, bias)
        if self.training:
            with torch.no_grad():
                norm = weight.flatten(1).norm(dim=1).clamp_min(_EPS)
                mean_s, mean_s2, _, _ = _neuron_stats(self.spec.act.d1(u), norm, self.spec.channel_dim % u.dim())
            self.update_stats(mean_s, mean_s2)
        return u


# ------------------------------------------------------------------------------ recurrent modules
class _InjectGrads(torch.autograd.Function):
    """Identity on ``outs``; its backward adds precomputed ``grads`` to ``params``' gradients."""

    @staticmethod
    def forward(ctx, n_params: int, n_outs: int, *tensors: Tensor):
        grads = tensors[n_params: 2 * n_params]
        ctx.n_params = n_params
        ctx.save_for_backward(*grads)
        outs = tensors[2 * n_params:]
        return tuple(o.view_as(o) for o in outs)

    @staticmethod
    def backward(ctx, *out_grads):
        return (None, None, *ctx.saved_tensors, *([None] * ctx.n_params), *out_grads)


class RecurrentProbe(NeuronProbe):
    """Measures and adjusts the gate neurons of an nn.RNN/LSTM/GRU or RNNCell/LSTMCell/GRUCell.

    ``forward(out, x, hx, *params)`` returns ``out`` (same values and structure). ``params`` are the
    module's parameters in :attr:`param_names` order. Neurons are the rows of ``weight_ih`` (gate
    neurons: 4H for LSTM, 3H for GRU, H for Elman), per layer and direction, in module order. A gate
    neuron's weights are its row of ``weight_ih`` and of ``weight_hh``; with
    ``SALConfig.recurrent_only`` only the ``weight_hh`` row counts in ``||w_j||``. The GRU candidate's
    recurrent input is ``r * h`` (the reset gate multiplies it, as in torch's GRU).
    """

    def __init__(self, layer: str, module: nn.Module, kind: str, sal: SALConfig, n_calls: int = 1):
        self.cell = kind.endswith("_cell")
        base = kind[:-5] if self.cell else kind
        H = module.hidden_size
        if base == "rnn":
            nonlin = getattr(module, "nonlinearity", "tanh")
            self.gate_acts: Tuple[str, ...] = (nonlin,)
        else:
            self.gate_acts = GATES[base]
        self.layers = 1 if self.cell else module.num_layers
        self.dirs = 1 if self.cell else (2 if module.bidirectional else 1)
        neurons = self.layers * self.dirs * len(self.gate_acts) * H
        dtype = (module.weight_ih if self.cell else module.weight_ih_l0).dtype
        super().__init__(layer, kind, neurons, "/".join(self.gate_acts), "sympy", sal, n_calls, dtype)
        from ..passes.activations import derivatives  # local import: activations imports nothing from here

        self.acts = [derivatives(a) for a in self.gate_acts]
        self.source = "/".join(sorted({a.source for a in self.acts}))
        self.base, self.H = base, H
        self.batch_first = bool(getattr(module, "batch_first", False))
        self.has_bias = (module.bias_ih is not None) if self.cell else bool(module.bias)
        self.param_names = [n for n, _ in module.named_parameters(recurse=False)]
        if not self.cell and getattr(module, "proj_size", 0):
            raise NotImplementedError("LSTM with proj_size")
        # One-layer templates run the lower layers of a stacked module again (their outputs are not
        # returned by the module). Kept in a list: not a registered submodule, no state_dict entry.
        self._templates: List[nn.Module] = []
        for l in range(self.layers - 1):
            kw: Dict[str, Any] = dict(num_layers=1, bias=self.has_bias, bidirectional=self.dirs == 2)
            if base == "rnn":
                kw["nonlinearity"] = self.gate_acts[0]
            in_size = module.input_size if l == 0 else H * self.dirs
            cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[base]
            self._templates.append(cls(in_size, H, **kw).to(module.weight_ih_l0.dtype))

    # -------------------------------------------------------------- per layer/direction blocks
    def _blocks(self, out: Any, x: Tensor, hx: Any, params: Dict[str, Tensor]):
        """Yield ``(suffix, inputs [n, M], h_prev [n, H])`` for every layer and direction, time-major."""
        if self.cell:
            h = hx[0] if isinstance(hx, (tuple, list)) else hx
            x2 = x if x.dim() == 2 else x.unsqueeze(0)
            h = torch.zeros(x2.shape[0], self.H, dtype=x.dtype, device=x.device) if h is None else h.reshape(-1, self.H)
            yield "", x2, h
            return
        seq = out[0]
        h0 = hx[0] if isinstance(hx, (tuple, list)) else hx
        unbatched = x.dim() == 2
        if unbatched:
            x, seq = x.unsqueeze(1), seq.unsqueeze(1)
        elif self.batch_first:
            x, seq = x.transpose(0, 1), seq.transpose(0, 1)
        T, B = x.shape[0], x.shape[1]
        if h0 is None:
            h0 = torch.zeros(self.layers * self.dirs, B, self.H, dtype=x.dtype, device=x.device)
        h0 = h0.reshape(self.layers * self.dirs, B, self.H)
        c0 = hx[1].reshape(h0.shape) if isinstance(hx, (tuple, list)) else torch.zeros_like(h0)
        inp = x
        for l in range(self.layers):
            y = seq if l == self.layers - 1 else self._run_layer(l, inp, h0, c0, params)
            for d in range(self.dirs):
                sfx = f"_l{l}" + ("_reverse" if d else "")
                yd = y[..., d * self.H:(d + 1) * self.H]
                first = h0[l * self.dirs + d].unsqueeze(0)
                prev = torch.cat([first, yd[:-1]]) if d == 0 else torch.cat([yd[1:], first])
                yield sfx, inp.reshape(T * B, -1), prev.reshape(T * B, self.H)
            inp = y

    def _run_layer(self, l: int, inp: Tensor, h0: Tensor, c0: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """Output sequence of hidden layer ``l`` (time-major), run with the stacked module's weights.

        Dropout between layers is not replayed (the probe sees the layer's dropout-free output).
        """
        renamed = {k.replace(f"_l{l}", "_l0"): v for k, v in params.items() if k.endswith(f"_l{l}") or f"_l{l}_" in k}
        sl = slice(l * self.dirs, (l + 1) * self.dirs)
        hx = (h0[sl], c0[sl]) if self.base == "lstm" else h0[sl]
        return torch.func.functional_call(self._templates[l], renamed, (inp, hx))[0]

    def forward(self, out: Any, x: Tensor, hx: Any, *flat: Tensor) -> Any:
        if not self.training:
            return out
        params = dict(zip(self.param_names, flat))
        active = self.sal_active()
        gate = self.gate() if active else None
        grads: Dict[str, Tensor] = {}
        s_parts: List[Tensor] = []
        s2_sum = 0.0
        n_total = 0
        with torch.no_grad():
            row0 = 0
            for sfx, xs, hs in self._blocks(out, x.detach(), _detach(hx), params):
                w_ih, w_hh = params["weight_ih" + sfx], params["weight_hh" + sfx]
                b_ih = params.get("bias_ih" + sfx)
                b_hh = params.get("bias_hh" + sfx)
                a_i = F.linear(xs, w_ih, b_ih)
                a_h = F.linear(hs, w_hh, b_hh)
                u, r = self._preact(a_i, a_h)
                d1, e = self._derivs(u)
                sq = w_hh.square().sum(1) if self.rule.recurrent_only else w_ih.square().sum(1) + w_hh.square().sum(1)
                norm = sq.sqrt().clamp_min(_EPS)
                mean_s, mean_s2, mean_d1, frac = _neuron_stats(d1, norm, 1, self.rule.log_form)
                s_parts.append(mean_s)
                s2_sum = s2_sum + mean_s2 * d1.numel()
                n_total += d1.numel()
                if active:
                    g = gate[row0: row0 + norm.numel()].to(w_hh.dtype)
                    c_u, c_w = _row_coefficients(self.rule, g, norm, mean_d1, frac, u.shape[0])
                    cu = e * c_u  # [n, N]: coefficient of the x-term per sample and neuron
                    cu_h = cu if r is None else torch.cat([cu[:, :2 * self.H], cu[:, 2 * self.H:] * r], 1)
                    grads["weight_ih" + sfx] = cu.t().mm(xs) + (0.0 if self.rule.recurrent_only else c_w[:, None] * w_ih)
                    grads["weight_hh" + sfx] = cu_h.t().mm(hs) + c_w[:, None] * w_hh
                    if b_ih is not None:
                        grads["bias_ih" + sfx] = cu.sum(0)
                        grads["bias_hh" + sfx] = cu_h.sum(0)
                row0 += norm.numel()
        self.update_stats(torch.cat(s_parts), s2_sum / n_total)
        if not active:
            return out
        names = [n for n in self.param_names if n in grads]
        leaves, spec = tree_flatten(out)
        tensors = [l for l in leaves if isinstance(l, Tensor)]
        new = iter(_InjectGrads.apply(len(names), len(tensors), *[params[n] for n in names],
                                      *[grads[n].to(params[n].dtype) for n in names], *tensors))
        return tree_unflatten([next(new) if isinstance(l, Tensor) else l for l in leaves], spec)

    def _preact(self, a_i: Tensor, a_h: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Pre-activations of all gate neurons; for GRU also the reset gate ``r`` (else None)."""
        if self.base != "gru":
            return a_i + a_h, None
        H = self.H
        rz = a_i[:, :2 * H] + a_h[:, :2 * H]
        r = torch.sigmoid(rz[:, :H])
        return torch.cat([rz, a_i[:, 2 * H:] + r * a_h[:, 2 * H:]], 1), r

    def _derivs(self, u: Tensor) -> Tuple[Tensor, Tensor]:
        H = self.H
        d1 = [a.d1(u[:, i * H:(i + 1) * H]) for i, a in enumerate(self.acts)]
        e = [(a.ratio if self.rule.log_form else a.d2)(u[:, i * H:(i + 1) * H]) for i, a in enumerate(self.acts)]
        return torch.cat(d1, 1), torch.cat(e, 1)


def _detach(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach()
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(a) for a in v)
    return v


# ------------------------------------------------------------------------------ driver
def probes_of(model: nn.Module) -> Dict[str, NeuronProbe]:
    """All probes in ``model`` (recursing into submodules, fixed-point bodies included), by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NeuronProbe)}


def __getattr__(name: str) -> Any:
    # The SAL handle is a front-door object: it lives in fxwormhole.instrument (``fxwormhole.SAL``).
    if name == "SAL":
        import warnings

        warnings.warn("fxwormhole.runtime.sensitivity.SAL moved: use fxwormhole.SAL", DeprecationWarning, stacklevel=2)
        from ..instrument import SAL

        return SAL
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
