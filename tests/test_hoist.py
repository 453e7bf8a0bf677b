"""Loop-invariant hoisting of traced VJP graphs (runtime/_hoist.py): the split graphs compute what
the original graph computes, at batch sizes other than the traced one, the per-iteration step holds
no forward work, and an in-place update can never leak into a hoisted tensor between calls."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxwormhole.runtime._hoist import Hoisted, functionalize


def _vjp(f):
    def vjp(z, ybar, *rest):
        with torch.enable_grad():
            leaf = z.detach().requires_grad_()
            return torch.autograd.grad(f(leaf, *rest), leaf, ybar)[0]
    return vjp


def _mlp(z, w1, w2):
    return torch.tanh(torch.tanh(z @ w1) @ w2)


def _split(f, example, loop_outputs=None):
    """Trace ``f(primal, cotangent, *rest)`` symbolically and hoist what does not depend on the cotangent."""
    gm = make_fx(f, tracing_mode="symbolic")(*example)
    return Hoisted(functionalize(gm, example), varying=[1], loop_outputs=loop_outputs)


def _prelude_outputs(hoisted):
    return next(n for n in hoisted.prelude.graph.nodes if n.op == "output").args[0]


def _ops(gm, name):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))


def test_split_graphs_equal_the_traced_vjp_at_other_batch_sizes_and_step_has_no_forward_matmul():
    torch.manual_seed(0)
    w1, w2 = torch.randn(8, 16, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    example = (torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), w1, w2)
    gm = make_fx(_vjp(_mlp), tracing_mode="symbolic")(*example)
    hoisted = Hoisted(functionalize(gm, example), varying=[1])
    for batch in (3, 7):
        z = torch.randn(batch, 8, dtype=torch.float64)
        step = hoisted.bind(z, w1, w2)
        for _ in range(2):  # the same binding serves every iteration
            ybar = torch.randn(batch, 8, dtype=torch.float64)
            want = torch.func.vjp(lambda t: _mlp(t, w1, w2), z)[1](ybar)[0]
            torch.testing.assert_close(step(ybar), want, rtol=1e-12, atol=1e-12)
    assert _ops(gm, "aten.mm") == 4  # two forward, two transposed products
    assert _ops(hoisted.step, "aten.mm") == 2 and _ops(hoisted.prelude, "aten.mm") == 2
    assert _ops(hoisted.step, "tanh.default") == 0


def test_in_place_update_of_a_hoisted_tensor_does_not_leak_between_iterations():
    def f(z, ybar, w):
        h = z @ w           # invariant
        buf = h.clone()     # invariant
        buf.add_(ybar)      # in place, depends on the carry: must not write into the hoisted buffer
        return buf * h

    w = torch.randn(5, 5)
    example = (torch.randn(4, 5), torch.randn(4, 5), w)
    hoisted = _split(f, example)
    z = torch.randn(6, 5)
    step = hoisted.bind(z, w)
    for _ in range(3):
        ybar = torch.randn(6, 5)
        torch.testing.assert_close(step(ybar), f(z, ybar, w))


def test_sizes_are_recomputed_in_the_step_not_passed_between_graphs():
    def f(z, ybar):
        b = z.shape[0]
        h = torch.sin(z).reshape(b * 2, -1)
        return (h * ybar.reshape(b * 2, -1)).reshape(b, -1)

    example = (torch.randn(4, 6), torch.randn(4, 6))
    hoisted = _split(f, example)
    outputs = _prelude_outputs(hoisted)
    assert all(isinstance(o.meta.get("val"), torch.Tensor) for o in outputs), "the prelude returns tensors only"
    z, ybar = torch.randn(9, 6), torch.randn(9, 6)
    torch.testing.assert_close(hoisted.bind(z)(ybar), f(z, ybar))
    assert _ops(hoisted.step, "sin") == 0


def test_views_are_recomputed_so_no_two_saved_tensors_alias():
    # torch.while_loop refuses closed-over tensors that alias each other (e.g. h and h.detach()).
    def f(z, ybar):
        h = torch.relu(z)
        return ybar * h + ybar.sum() * h.detach().t().t()

    example = (torch.randn(4, 3), torch.randn(4, 3))
    hoisted = _split(f, example)
    outputs = _prelude_outputs(hoisted)
    assert not any(getattr(o.target, "is_view", False) for o in outputs if o.op == "call_function")
    z, ybar = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(hoisted.bind(z)(ybar), f(z, ybar))


def test_loop_step_is_cut_down_to_the_first_output():
    # vjp wrt (z, w1, w2): the loop needs z's gradient only, not the weight-gradient products
    def vjp(z, ybar, w1, w2):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (z, w1, w2)]
            return torch.autograd.grad(_mlp(*leaves), leaves, ybar)

    torch.manual_seed(1)
    w1, w2 = torch.randn(8, 16, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    example = (torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), w1, w2)
    hoisted = _split(vjp, example, loop_outputs=1)
    z, ybar = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    bound = hoisted.bind(z, w1, w2)
    want = torch.func.vjp(_mlp, z, w1, w2)[1](ybar)
    for a, b in zip(bound(ybar), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bound.loop(ybar), want[0], rtol=1e-12, atol=1e-12)
    assert _ops(hoisted.step, "aten.mm") == 4 and _ops(hoisted.loop_step, "aten.mm") == 2
