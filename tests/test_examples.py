"""The experiment harness and tasks (examples/): short configurations end to end, plus the pieces
against references (closed-form baselines, numpy/scipy correlations, parameter budgets)."""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

harness = pytest.importorskip("harness")
tasks = pytest.importorskip("tasks")
pytest.importorskip("matplotlib")


def _quick(**kw) -> "harness.RunConfig":
    base = harness.RunConfig(steps=20, batch=16, lr=1e-2, hidden=14, eval_every=10, n_test=48, progress=False)
    return replace(base, **kw)


def _check_outputs(folder: Path, variants, rows):
    assert {"results.csv", "results.json", "per_sample.csv", "iterations_vs_difficulty.png"} <= {p.name for p in folder.iterdir()}
    with open(folder / "results.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in csv_rows] == list(variants)
    data = json.loads((folder / "results.json").read_text())
    assert [r["variant"] for r in data["rows"]] == list(variants)
    for r in rows:
        assert math.isfinite(r["first_train_loss"]) and math.isfinite(r["final_train_loss"]) and math.isfinite(r["test_loss"])
        assert r["final_train_loss"] < r["first_train_loss"], r
        assert abs(r["params_vs_budget"]) <= 0.05 + 1e-9, r  # matched budget
        assert r["ms_per_step"] > 0 and r["s_per_epoch"] > 0
        if "+wh" in r["variant"]:
            assert r["fwd_iters_test"] >= 1 and r["fwd_iters_train"] >= 1 and r["bwd_iters_train"] >= 1
        else:
            assert math.isnan(r["fwd_iters_test"])
    with open(folder / "per_sample.csv") as fh:
        per = list(csv.DictReader(fh))
    assert per and all(float(p["fwd_iterations"]) >= 1 for p in per)


def test_adding_short_run(tmp_path):
    variants = ("lstm", "gru", "lstm+wh", "gru+wh+sal")
    task = tasks.Adding(T=10)
    rows = harness.run_task(task, variants, _quick(), tmp_path, log=lambda s: None)
    _check_outputs(tmp_path / "adding_T10", variants, rows)
    for r in rows:
        assert r["test_metric"] == pytest.approx(r["test_loss"])  # the metric is the MSE


def test_copy_short_run(tmp_path):
    variants = ("lstm", "lstm+wh")
    rows = harness.run_task(tasks.CopyMemory(T=5), variants, _quick(steps=15), tmp_path, log=lambda s: None)
    _check_outputs(tmp_path / "copy_T5", variants, rows)
    for r in rows:
        assert 0.0 <= r["recall_acc"] <= 1.0


def test_digits_short_runs(tmp_path):
    pytest.importorskip("sklearn")
    variants = ("gru", "lstm+wh+sal")
    rows = harness.run_task(tasks.Digits("rows"), variants, _quick(steps=15), tmp_path, log=lambda s: None)
    _check_outputs(tmp_path / "digits_rows", variants, rows)
    for r in rows:
        assert 0.0 <= r["test_metric"] <= 1.0 and r["epoch_samples"] == 1438
    rows = harness.run_task(tasks.Digits("pixels"), ("lstm",), _quick(steps=8, eval_every=8), tmp_path, log=lambda s: None)
    assert rows[0]["task"] == "digits_pixels" and rows[0]["final_train_loss"] < rows[0]["first_train_loss"]


# ---- pieces against references ---------------------------------------------------------------
def test_adding_targets_and_trivial_baseline():
    task = tasks.Adding(T=30)
    x, y, dist = task.batch(20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 30, 2) and bool((x[..., 1].sum(1) == 2).all())
    assert torch.allclose(y, (x[..., 0] * x[..., 1]).sum(1))
    pos = x[..., 1].nonzero()[:, 1].view(-1, 2)
    assert torch.equal(dist, (pos[:, 1] - pos[:, 0]).float())
    mse_of_one = float(((1.0 - y) ** 2).mean())  # predicting the mean: variance of U+U = 1/6
    assert mse_of_one == pytest.approx(task.baseline, abs=0.006)


def test_copy_memoryless_baseline_is_the_closed_form():
    task = tasks.CopyMemory(T=40)
    x, y, _ = task.batch(8, torch.Generator().manual_seed(1))
    assert x.shape == (8, 60, 10) and bool((x.argmax(-1)[:, 49] == 9).all())
    assert torch.equal(y[:, -10:], x.argmax(-1)[:, :10])
    logits = torch.full((8, 60, 9), -1e4)
    logits[:, :50, 0] = 0.0           # blanks where the target is blank
    logits[:, 50:, 1:] = 0.0          # uniform over the 8 symbols in the recall window
    assert float(task.loss(logits, y)) == pytest.approx(10 * math.log(8) / 60, rel=1e-6)
    assert task.baseline == pytest.approx(10 * math.log(8) / 60)


def test_correlations_match_numpy_and_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 6, (200,), generator=g).float()  # ties
    b = a * 0.5 + torch.randn(200, generator=g)
    assert harness.correlation(a, b) == pytest.approx(np.corrcoef(a.numpy(), b.numpy())[0, 1], abs=1e-9)
    assert harness.correlation(a, b, rank=True) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-9)
    assert math.isnan(harness.correlation(a, torch.full((200,), 3.0)))


def test_budget_matching_counts_the_wormhole_parameters():
    import fxwormhole

    cfg = _quick(hidden=24)
    task = tasks.Adding(T=6)
    budget = harness.count_params(task, "lstm", 24, cfg)
    for v in ("gru", "lstm+wh", "gru+wh+sal"):
        h = harness.match_hidden(task, v, budget, cfg)
        model = harness.build(task, v, h, cfg)
        n = sum(p.numel() for p in model.parameters())
        assert n == harness.count_params(task, v, h, cfg)
        assert abs(n / budget - 1) <= 0.05
        if "+wh" in v:
            assert isinstance(model, fxwormhole.transformed.TransformedModule) and model.wormhole_parameters()
