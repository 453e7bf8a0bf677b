"""The temporal runtime's per-step solve loop against a per-sample reference loop.

The map is ``f(x) = a * x + b`` per sample (different contraction rates, so samples finish at
different iterations), with an intermediate ``aux = 10 x + 1`` of the evaluated point. The
reference iterates each sample alone with the library's schedule; the loop must give the same
answer, iteration count, residual and intermediate whatever its read schedule (``sync_from``),
with per-sample compaction or frozen samples, and for a map that writes its intermediate in place.
"""
from __future__ import annotations

import pytest
import torch

from fxwormhole.runtime.temporal_solve import LoopSpec, StepMap, limits, solve_step

B = 12


class Affine(StepMap):
    def __init__(self, a, b, in_place=False):
        self.a, self.b, self.in_place = a, b, in_place
        self.buf = torch.empty(B, 1, dtype=a.dtype)
        self.evaluations = 0

    def evaluate(self, x):
        self.evaluations += 1
        x = torch.zeros_like(self.b) if x is None else x
        aux = torch.add(x * 10, 1, out=self.buf[: x.shape[0]]) if self.in_place else x * 10 + 1
        return (aux,), self.a * x + self.b

    def residual(self, x, fx):
        x = torch.zeros_like(fx) if x is None else x
        return (fx - x).norm(dim=1) / (fx.norm(dim=1) + 1e-12)

    def compact(self, keep):
        self.a, self.b = self.a[keep], self.b[keep]


def reference(a, b, tol, max_iter):
    out = []
    for ai, bi in zip(a.flatten().tolist(), b.flatten().tolist()):
        x, k = 0.0, 0
        while True:
            fx = ai * x + bi
            k += 1
            r = abs(fx - x) / (abs(fx) + 1e-12)
            if r <= tol or k >= max_iter:
                out.append((x, k, r))
                break
            x = fx
    return out


@pytest.mark.parametrize("sync_from", [1, 3, 9])
@pytest.mark.parametrize("compact,in_place", [(True, False), (False, False), (False, True)],
                         ids=["compact", "frozen", "frozen_in_place"])  # compaction goes with fresh intermediates
def test_answers_do_not_depend_on_the_read_schedule(compact, in_place, sync_from):
    torch.manual_seed(0)
    a = torch.linspace(0.05, 0.9, B, dtype=torch.float64).unsqueeze(1)
    b = torch.randn(B, 1, dtype=torch.float64)
    spec = LoopSpec(tol=1e-6, max_iter=40, check_every=1, factor=1e4, batch_halt=False, compact=compact)
    m = Affine(a.clone(), b.clone(), in_place)
    r = solve_step(m, None, B, spec, limits(spec, a), sync_from)
    aux = m.evaluate(r.x)[0] if r.stale else r.aux  # what the runtime's callers do
    ref = reference(a, b, 1e-6, 40)
    iters = r.iterations if isinstance(r.iterations, torch.Tensor) else torch.full((B,), r.iterations)
    assert [int(i) for i in iters] == [k for _, k, _ in ref]
    assert len(set(k for _, k, _ in ref)) > 3  # samples really finish at different iterations
    x = torch.zeros(B, 1, dtype=torch.float64) if r.x is None else r.x
    assert torch.allclose(x.flatten(), torch.tensor([v for v, _, _ in ref], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(r.residual, torch.tensor([v for _, _, v in ref], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.allclose(aux[0], 10 * x + 1, rtol=0, atol=1e-13)


def test_compaction_spends_evaluations_only_on_live_samples():
    a = torch.cat([torch.full((B - 1, 1), 0.01), torch.full((1, 1), 0.9)]).double()
    b = torch.ones(B, 1, dtype=torch.float64)
    spec = LoopSpec(tol=1e-8, max_iter=400, check_every=1, factor=1e4, batch_halt=False, compact=True)
    rows_seen = []

    class Counting(Affine):
        def evaluate(self, x):
            rows_seen.append(self.a.shape[0])
            return super().evaluate(x)

    r = solve_step(Counting(a, b), None, B, spec, limits(spec, a))
    assert int(r.iterations.max()) > 100 and int(r.iterations.min()) < 10
    assert sum(rows_seen) < 2 * 100 + B * 10  # the slow sample iterates alone
