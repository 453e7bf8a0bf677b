"""examples/torchrun_train.py under a real ``torchrun`` with 2 local processes (gloo, CPU).

DDP (fast suite): SGD without SAL, so the reference is exact arithmetic: the parameters saved by
rank 0 equal those of one process that trains on the whole global batch (DDP averages the two
shards' gradients), both replicas end with the same parameters (checksums), the loss falls, and the
saved folder loads and reproduces the test accuracy the run reported. FSDP2 (slow suite): the same
with SAL and Adam, the shards gathered by fxwormhole.save.

Bounded: torchrun's subprocess is killed after TIMEOUT_S, and the script's process group times out
after 120 s.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxwormhole
from fxwormhole import zoo

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "torchrun_train.py"
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _example():
    spec = importlib.util.spec_from_file_location("torchrun_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test accuracy" in done.stdout
    return json.loads((out / "results.json").read_text())


def _accuracy(net, x, y) -> float:
    net.eval()
    with torch.no_grad():
        return (net(x).argmax(-1) == y).float().mean().item()


def test_torchrun_ddp_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    ex = _example()
    steps = 6
    result = _torchrun(tmp_path / "ddp", "--steps", str(steps), "--optimizer", "sgd", "--no-sal", "--log-every", "3")
    assert result["world"] == 2 and len(result["losses"]) == steps
    assert result["checksums"][0] == result["checksums"][1], "DDP replicas diverged"
    assert result["losses"][-1] < result["losses"][0]

    # one process, the whole global batch: what DDP's averaged gradients compute
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = ex.digits()
    ref = ex.build(sal=False)
    opt = ex.make_optimizer(ref.parameters(), "sgd", None)
    losses = []
    for step in range(steps):
        xb, yb = ex.global_batch(step, x_train, y_train, 64)
        loss = F.cross_entropy(ref(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    saved = fxwormhole.load(tmp_path / "ddp", zoo.MLP(in_features=64, hidden=32, depth=3, out_features=10))
    ref_params, got = dict(ref.named_parameters()), dict(saved.named_parameters())
    for name, p in ref_params.items():
        torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-4, atol=1e-5)
    assert _accuracy(saved, x_test, y_test) == result["test_accuracy"]
    opt2 = fxwormhole.load_optimizer(tmp_path / "ddp", torch.optim.SGD(saved.parameters(), lr=0.1))
    assert len(opt2.param_groups[0]["params"]) == len(ref_params)


@pytest.mark.slow
def test_torchrun_fsdp2_with_sal_trains_and_saves_the_gathered_model(tmp_path):
    ex = _example()
    result = _torchrun(tmp_path / "fsdp", "--fsdp", "--steps", "20", "--log-every", "10")
    assert result["fsdp"] and result["sal"]
    assert result["checksums"][0] == result["checksums"][1]
    assert sum(result["losses"][-3:]) < sum(result["losses"][:3])
    _, _, x_test, y_test = ex.digits()
    saved = fxwormhole.load(tmp_path / "fsdp", zoo.MLP(in_features=64, hidden=32, depth=3, out_features=10))
    assert any("sal_probe" in k for k in saved.state_dict())
    assert _accuracy(saved, x_test, y_test) == result["test_accuracy"]
