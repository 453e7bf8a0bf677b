"""Shared training harness of the experiments: models at a matched parameter budget, a seeded
training loop with a progress bar, CSV/JSON results and the iterations-vs-difficulty plot.

Variants (``VARIANTS``): ``lstm``, ``gru`` (plain torch modules), ``lstm+wh``, ``gru+wh`` (the same
models through :func:`fxwormhole.transform` with temporal wormholes), ``lstm+wh+sal``,
``gru+wh+sal`` (wormholes plus sensitivity probes and SAL). Each variant's hidden size is chosen so
that its parameter count is as close as possible to the budget (the parameter count of the plain
LSTM at ``--hidden``); the count is reported next to every result.

Model: ``proj`` (linear, ``input -> hidden``, tanh) -> ``rnn`` (``layers`` stacked LSTM/GRU,
batch_first) -> ``head`` (linear) on the last step, or on every step for per-step tasks. The
temporal wormhole goes from the top layer's hidden state back to the bottom layer's input at the same
step (``WormholeConfig(wormholes="auto")``).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import fxwormhole
from fxwormhole import SALConfig, WormholeConfig
from fxwormhole.cli.demo import DEMO_WORMHOLES, TrainLog, per_sample_iterations, progress, pyplot
from fxwormhole.runtime.recurrent import add_temporal_wormhole

from tasks import Task

VARIANTS = ("lstm", "gru", "lstm+wh", "gru+wh", "lstm+wh+sal", "gru+wh+sal")

#: The experiments' wormholes: the demo's (input gates at bias -1, Picard, tol 1e-4, max_iter 30)
#: with a larger initial projection (std 0.3), so that iteration counts differ per sample from the
#: start instead of only after the gates have opened.
EXPERIMENT_WORMHOLES = replace(DEMO_WORMHOLES, proj_std=0.3)


class SeqModel(nn.Module):
    """``proj`` -> tanh -> ``rnn`` (LSTM/GRU) -> ``head`` (last step, or every step)."""

    def __init__(self, kind: str, input_size: int, hidden: int, output_size: int, layers: int = 2,
                 per_step: bool = False) -> None:
        super().__init__()
        self.per_step = per_step
        self.proj = nn.Linear(input_size, hidden)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, output_size)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(torch.tanh(self.proj(x)))
        return self.head(out if self.per_step else out[:, -1])


@dataclass
class RunConfig:
    """One experiment's settings (recorded with its results)."""

    steps: int = 300
    batch: int = 64
    lr: float = 1e-2
    hidden: int = 32              # sets the budget: parameters of the plain LSTM at this size
    layers: int = 2
    eval_every: int = 50
    n_test: int = 512
    epoch_samples: int = 1024     # one "epoch" of a synthetic task (digits: the training split)
    seed: int = 0
    clip: float = 1.0
    threads: int = 1
    sal_eta: float = 1e-3
    wormholes: WormholeConfig = field(default_factory=lambda: EXPERIMENT_WORMHOLES)
    progress: bool = True


def _kind(variant: str) -> str:
    return variant.split("+")[0]


def _base(task: Task, variant: str, hidden: int, layers: int) -> SeqModel:
    return SeqModel(_kind(variant), task.input_size, hidden, task.output_size, layers, task.per_step)


def count_params(task: Task, variant: str, hidden: int, cfg: RunConfig) -> int:
    """Parameters of ``variant`` at ``hidden`` (SAL adds buffers, no parameters)."""
    model = _base(task, variant, hidden, cfg.layers)
    n = sum(p.numel() for p in model.parameters())
    if "+wh" in variant:
        rnn = add_temporal_wormhole(model.rnn, cfg.wormholes)
        n += sum(p.numel() for p in rnn.temporal_wormholes.parameters())
    return n


def match_hidden(task: Task, variant: str, budget: int, cfg: RunConfig) -> int:
    """The hidden size whose parameter count is closest to ``budget`` (counts grow with hidden)."""
    lo, hi = 1, 4 * cfg.hidden + 8
    while lo < hi:  # smallest h with count >= budget
        mid = (lo + hi) // 2
        if count_params(task, variant, mid, cfg) >= budget:
            hi = mid
        else:
            lo = mid + 1
    cands = [h for h in (lo - 1, lo) if h >= 1]
    return min(cands, key=lambda h: abs(count_params(task, variant, h, cfg) - budget))


def build(task: Task, variant: str, hidden: int, cfg: RunConfig) -> nn.Module:
    """The model of ``variant`` (transformed by fxwormhole for ``+wh`` variants)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {VARIANTS}")
    model = _base(task, variant, hidden, cfg.layers)
    if "+wh" not in variant:
        return model
    example = task.test_set(2, cfg.seed)[0]
    sal = SALConfig(eta=cfg.sal_eta) if variant.endswith("+sal") else None
    return fxwormhole.transform(model, (example,), cfg.wormholes, sal=sal)


def _evaluate(task: Task, model: nn.Module, data, chunk: int = 256) -> dict:
    x, y, _ = data
    model.eval()
    outs, fwd = [], []
    with torch.no_grad():
        for i in range(0, len(y), chunk):
            outs.append(model(x[i:i + chunk]))
            f, _ = per_sample_iterations(model)
            if f is not None:
                fwd.append(f)
    model.train()
    out = torch.cat(outs)
    extra = task.recall_accuracy(out, y) if hasattr(task, "recall_accuracy") else None
    return {"metric": task.metric(out, y), "loss": float(task.loss(out, y)),
            "per_sample_loss": task.per_sample_loss(out, y), "iterations": torch.cat(fwd) if fwd else None,
            "recall_acc": extra}


def correlation(a: Tensor, b: Tensor, rank: bool = False) -> float:
    """Pearson correlation (Spearman's with ``rank=True``); NaN when either side is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    if rank:
        a, b = _ranks(a), _ranks(b)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 1e-12 else math.nan


def _ranks(v: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank)."""
    sorted_v, order = v.sort()
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=v.dtype)
    uniq, inverse = torch.unique(sorted_v, return_inverse=True)
    mean_rank = torch.zeros(len(uniq), dtype=v.dtype).index_add_(0, inverse, torch.arange(len(v), dtype=v.dtype))
    mean_rank /= torch.bincount(inverse, minlength=len(uniq)).to(v.dtype)
    ranks[order] = mean_rank[inverse]
    return ranks


def train_variant(task: Task, variant: str, hidden: int, cfg: RunConfig) -> dict:
    """Train one variant; returns its result row plus curves and per-sample test data."""
    torch.manual_seed(cfg.seed)
    model = build(task, variant, hidden, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # every variant sees the same batches
    test = task.test_set(cfg.n_test, cfg.seed)
    rec, evals = TrainLog(), []
    model.train()
    for step in progress(range(1, cfg.steps + 1), total=cfg.steps, desc=f"{task.tag()} {variant}", enabled=cfg.progress):
        x, y, _ = task.train_batch(cfg.batch, gen)
        rec.step(model, opt, lambda: task.loss(model(x), y), cfg.clip)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = _evaluate(task, model, test)
            evals.append((step, ev["metric"], ev["loss"]))
    final = _evaluate(task, model, test)
    difficulty = test[2] if test[2] is not None else final["per_sample_loss"]
    it = final["iterations"]
    per_step_s = rec.seconds / cfg.steps
    epoch = len(task.ytr) if hasattr(task, "ytr") else cfg.epoch_samples
    losses = rec.losses
    tail = losses[-max(1, len(losses) // 10):]
    row = {
        "task": task.tag(), "variant": variant, "hidden": hidden,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed,
        "first_train_loss": losses[0], "final_train_loss": sum(tail) / len(tail),
        "test_metric": final["metric"], "metric_name": task.metric_name, "test_loss": final["loss"],
        "recall_acc": final["recall_acc"], "baseline": task.baseline,
        "ms_per_step": 1000 * per_step_s, "s_per_epoch": per_step_s * math.ceil(epoch / cfg.batch),
        "epoch_samples": epoch,
        "fwd_iters_test": float(it.mean()) if it is not None else math.nan,
        "fwd_iters_train": rec.mean_fwd,
        "bwd_iters_train": rec.mean_bwd,
        "difficulty": task.difficulty_name,
        "r_difficulty": correlation(difficulty, it) if it is not None else math.nan,
        "rho_difficulty": correlation(difficulty, it, rank=True) if it is not None else math.nan,
        "r_loss": correlation(final["per_sample_loss"], it) if it is not None else math.nan,
    }
    return {"row": row, "losses": losses, "evals": evals, "difficulty": difficulty, "iterations": it,
            "per_sample_loss": final["per_sample_loss"]}


def run_task(task: Task, variants: Sequence[str], cfg: RunConfig, out: Path, log=print) -> List[dict]:
    """Train every variant at a matched budget; write ``out/<task>/`` results; return the rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        folder = Path(out) / task.tag()
        folder.mkdir(parents=True, exist_ok=True)
        budget = count_params(task, "lstm", cfg.hidden, cfg)
        runs: Dict[str, dict] = {}
        for v in variants:
            h = cfg.hidden if v == "lstm" else match_hidden(task, v, budget, cfg)
            runs[v] = train_variant(task, v, h, cfg)
            r = runs[v]["row"]
            log(f"{task.tag():>14} {v:<12} hidden {h:3d} params {r['params']:6d}  {task.metric_name} "
                f"{r['test_metric']:.4f}  {r['ms_per_step']:.0f} ms/step  fwd it {r['fwd_iters_test']:.2f}")
        rows = [r["row"] for r in runs.values()]
        for r in rows:
            r["budget"], r["params_vs_budget"] = budget, r["params"] / budget - 1
        _write(folder, task, cfg, runs, rows)
        return rows
    finally:
        torch.set_num_threads(threads)


def _write(folder: Path, task: Task, cfg: RunConfig, runs: Dict[str, dict], rows: List[dict]) -> None:
    with open(folder / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(folder / "per_sample.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "difficulty", "test_loss", "fwd_iterations"])
        for v, run in runs.items():
            if run["iterations"] is not None:
                for d, l, i in zip(run["difficulty"].tolist(), run["per_sample_loss"].tolist(), run["iterations"].tolist()):
                    w.writerow([v, d, l, i])
    cfg_json = {**asdict(replace(cfg, wormholes=None)), "wormholes": str(cfg.wormholes)}
    payload = {"task": task.tag(), "baseline": task.baseline, "baseline_note": task.baseline_note,
               "difficulty": task.difficulty_name, "config": cfg_json, "rows": rows,
               "curves": {v: {"train_loss": r["losses"], "evals": r["evals"]} for v, r in runs.items()}}
    (folder / "results.json").write_text(json.dumps(payload, indent=1))
    plot_iterations(folder / "iterations_vs_difficulty.png", task, runs)


def plot_iterations(path: Path, task: Task, runs: Dict[str, dict]) -> Optional[Path]:
    """Per-sample forward iterations against difficulty, one colour per wormhole variant."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    for v, run in runs.items():
        it = run["iterations"]
        if it is None:
            continue
        d, row = run["difficulty"], run["row"]
        ax.scatter(d.numpy(), it.numpy(), s=6, alpha=0.35, label=f"{v}: r={row['r_difficulty']:.2f}, rho={row['rho_difficulty']:.2f}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if task.difficulty_name.startswith("per-sample"):
        ax.set_xscale("log")
    ax.set(xlabel=f"difficulty: {task.difficulty_name}", ylabel="forward iterations per step (mean over T)",
           title=f"{task.tag()}: do easy inputs settle sooner?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
