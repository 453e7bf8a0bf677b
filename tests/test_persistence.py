"""fxwormhole.save / fxwormhole.load: a transformed model as a folder (config JSON + safetensors).

What is checked:

* train -> save -> load -> continue training equals uninterrupted training bit for bit (every
  parameter, every buffer, every loss), with the optimizer state saved alongside, for a feedforward
  model with an open wormhole and SAL and for an LSTM with a temporal wormhole;
* the loaded model is in the saved training mode, its parameters come in the saved order, the user's
  model and the global random generator are untouched;
* a folder in format 1, written by the frozen format-1 writer below and committed under
  tests/fixtures/save_v1, still loads and reproduces the outputs recorded with it;
* every damaged, missing or mismatched save is a LoadError naming the file and what to do.
"""
from __future__ import annotations

import copy
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxwormhole
from fxwormhole import ConfigError, LoadError, SALConfig, SaveError, WormholeConfig, zoo
from fxwormhole.persistence import CONFIG_FILE, FORMAT_VERSION, OPTIMIZER_FILE, WEIGHTS_FILE

pytest.importorskip("safetensors")
pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "save_v1"
OPEN = dict(gate_init=0.0, proj_init="normal", proj_std=0.3, solver="anderson", tol=1e-6)


def _mlp() -> torch.nn.Module:
    return zoo.MLP(in_features=6, hidden=10, depth=3, out_features=3)


def _lstm() -> torch.nn.Module:
    return zoo.LSTMClassifier(in_features=4, hidden=6, num_layers=2, seq=3, classes=3)


CASES = {
    "mlp_wormhole_sal": (_mlp, (12, 6), WormholeConfig(wormholes=[("layers.2", "layers.0")], **OPEN), SALConfig(eta=1e-2)),
    # a parametrized (spectrally normalised) projection and per-channel gates
    "mlp_spectral_norm": (_mlp, (12, 6), WormholeConfig(gate="channel", spectral_norm=True, **OPEN), None),
    "lstm_temporal": (_lstm, (12, 3, 4), WormholeConfig(gate="input", **OPEN), None),
}


def _batches(shape: tuple, n: int) -> list:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)) for _ in range(n)]


def _train(net, opt, batches) -> list[float]:
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _state(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_train_save_load_continue_is_bit_for_bit_uninterrupted_training(case, tmp_path):
    build, shape, config, sal = CASES[case]
    torch.manual_seed(0)
    net = fxwormhole.transform(build(), (torch.randn(shape),), config, sal=sal)
    twin = copy.deepcopy(net)
    batches = _batches(shape, 6)

    # uninterrupted: 6 steps
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    uninterrupted = _train(twin, opt, batches)

    # interrupted: 3 steps, save, load into a freshly built model (other weights), 3 more steps
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = _train(net, opt, batches[:3])
    fxwormhole.save(net, tmp_path / "ckpt", optimizer=opt)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE])
    torch.manual_seed(123)
    loaded = fxwormhole.load(tmp_path / "ckpt", build())
    assert isinstance(loaded, fxwormhole.transformed.TransformedModule) and loaded.training
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in net.named_parameters()]
    opt2 = fxwormhole.load_optimizer(tmp_path / "ckpt", torch.optim.Adam(loaded.parameters(), lr=1e-2))
    second = _train(loaded, opt2, batches[3:])

    assert first + second == uninterrupted  # exact float equality, step by step
    want, got = _state(twin), _state(loaded)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    its = [s.iterations.float().mean().item() for s in loaded.fixed_point_stats().values() if s is not None]
    assert its and max(its) > 1.5, "the wormholes are open: the fixed points must iterate"
    if sal is not None:
        assert any("sal_probe" in k and k.endswith("count") and float(v) > 0 for k, v in got.items())


def test_load_for_inference_keeps_eval_mode_and_outputs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    net = fxwormhole.transform(_mlp(), (x,), WormholeConfig(**OPEN)).eval()
    fxwormhole.save(net, tmp_path / "m")
    assert not (tmp_path / "m" / OPTIMIZER_FILE).exists()
    loaded = fxwormhole.load(tmp_path / "m", _mlp())
    assert not loaded.training and not any(m.training for m in loaded.modules())
    other_batch = torch.randn(17, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
        assert torch.equal(loaded(other_batch), net(other_batch))


def test_load_leaves_the_user_model_and_the_global_generator_alone(tmp_path):
    torch.manual_seed(0)
    net = fxwormhole.transform(_mlp(), (torch.randn(4, 6),), WormholeConfig(**OPEN))
    fxwormhole.save(net, tmp_path / "m")
    model = _mlp().eval()
    model.layers[1].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    fxwormhole.load(tmp_path / "m", model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_saving_into_the_same_folder_replaces_the_save_and_keeps_frozen_submodules(tmp_path):
    torch.manual_seed(0)
    net = fxwormhole.transform(_mlp(), (torch.randn(4, 6),), WormholeConfig(**OPEN))
    fxwormhole.save(net, tmp_path / "m")
    with torch.no_grad():
        net.head.weight.fill_(0.25)
    frozen = next(m for name, m in net.named_modules() if name.endswith("layers.1"))
    frozen.eval()
    fxwormhole.save(net, tmp_path / "m")
    loaded = fxwormhole.load(tmp_path / "m", _mlp())
    assert torch.equal(loaded.head.weight, torch.full_like(loaded.head.weight, 0.25))
    flags = {n: m.training for n, m in loaded.named_modules()}
    assert loaded.training and [n for n, f in flags.items() if not f] == [n for n, m in net.named_modules() if not m.training]
    assert not list(tmp_path.glob("m/.*")), "no temporary file left behind"
    umask = os.umask(0)
    os.umask(umask)
    for file in (tmp_path / "m").iterdir():  # as open() would make them (safetensors alone makes 0o600)
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


# --- format 1 -----------------------------------------------------------------------------------
def write_v1_fixture(folder: Path) -> None:
    """The frozen format-1 writer that made tests/fixtures/save_v1 (kept to document the format;
    run ``python tests/test_persistence.py`` to rewrite the fixture).

    Format 1 recorded the input shapes only (float32 implied), the training flag, the configs and
    the weights' checksum; format 2 adds dtypes, both training flags and the parameter order.
    """
    import dataclasses
    import hashlib

    import safetensors.torch as st

    torch.manual_seed(0)
    model = zoo.MLP(in_features=3, hidden=4, depth=2, out_features=2)
    x = torch.randn(2, 3)
    config = WormholeConfig(wormholes=[("layers.1", "layers.0")], gate_init=0.0, proj_init="normal", proj_std=0.5,
                            solver="picard", tol=1e-6)
    net = fxwormhole.transform(model, (x,), config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    st.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    wc = dataclasses.asdict(config)
    wc["wormholes"] = [list(p) for p in config.wormholes]
    (folder / "fxwormhole_config.json").write_text(json.dumps({
        "format": "fxwormhole.transformed", "format_version": 1, "fxwormhole_version": "0.1.0",
        "model_class": "fxwormhole.zoo.MLP", "front_end": "symbolic_trace", "input_shapes": [[2, 3]],
        "wormhole_config": wc, "sal_config": None, "training": False,
        "weights": {"file": "model.safetensors",
                    "sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()},
    }, indent=1) + "\n")
    probe = torch.linspace(-1, 1, 12).reshape(4, 3)
    with torch.no_grad():
        st.save_file({"x": probe, "y": net(probe)}, str(folder / "expected.safetensors"))


def test_a_format_1_save_still_loads_and_computes_what_it_computed():
    import safetensors.torch as st

    assert FORMAT_VERSION > 1
    assert json.loads((FIXTURE_V1 / CONFIG_FILE).read_text())["format_version"] == 1
    net = fxwormhole.load(FIXTURE_V1, zoo.MLP(in_features=3, hidden=4, depth=2, out_features=2))
    expected = st.load_file(str(FIXTURE_V1 / "expected.safetensors"))
    assert not net.training
    with torch.no_grad():
        torch.testing.assert_close(net(expected["x"]), expected["y"], rtol=0, atol=1e-6)
    assert net.fixed_point_stats()["fixed_point_0"].iterations.float().mean() > 2  # a real fixed point


# --- errors ---------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    net = fxwormhole.transform(_mlp(), (torch.randn(4, 6),), WormholeConfig(**OPEN))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return fxwormhole.save(net, tmp_path / "m", optimizer=opt)


def _edit_config(folder: Path, **changes) -> None:
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("damage, needle", [
    ("no folder", r"no such folder; pass the folder that fxwormhole.save"),
    ("no config", r"holds no fxwormhole_config.json, so it is not a folder written by fxwormhole.save"),
    ("config not json", r"fxwormhole_config.json is damaged: not valid JSON .*save the model again or restore"),
    ("not our format", r"is not an fxwormhole save"),
    ("newer format", r"in format 99; this fxwormhole reads formats up to \d+: upgrade fxwormhole"),
    ("weights missing", r"model.safetensors \(the weights\) is missing; .*copy the whole folder"),
    ("weights flipped", r"model.safetensors \(the weights\) does not match the checksum .*save the model again"),
    ("bad config field", r"its wormhole_config cannot be read by this fxwormhole .*transform the model again"),
])
def test_a_damaged_save_is_a_load_error_naming_the_file(saved, damage, needle):
    folder = saved
    if damage == "no folder":
        folder = saved / "nope"
    elif damage == "no config":
        (saved / CONFIG_FILE).unlink()
    elif damage == "config not json":
        (saved / CONFIG_FILE).write_text('{"format": "fxwormhole.trans')
    elif damage == "not our format":
        _edit_config(saved, format="something else")
    elif damage == "newer format":
        _edit_config(saved, format_version=99, fxwormhole_version="9.0")
    elif damage == "weights missing":
        (saved / WEIGHTS_FILE).unlink()
    elif damage == "weights flipped":
        data = bytearray((saved / WEIGHTS_FILE).read_bytes())
        data[-3] ^= 0x10
        (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    elif damage == "bad config field":
        config = json.loads((saved / CONFIG_FILE).read_text())
        config["wormhole_config"]["gate_of_the_future"] = 1
        _edit_config(saved, wormhole_config=config["wormhole_config"])
    with pytest.raises(LoadError, match=needle):
        fxwormhole.load(folder, _mlp())


def test_a_model_of_another_shape_is_a_mismatch_naming_the_saved_class(saved):
    with pytest.raises(LoadError, match=r"saved from a fxwormhole.zoo.MLP whose transformed parameters differ .*"
                                        r"pass a model built with the same class and constructor arguments"):
        fxwormhole.load(saved, zoo.MLP(in_features=6, hidden=11, depth=3, out_features=3))
    with pytest.raises(LoadError, match=r"missing \[.*layers.2"):
        fxwormhole.load(saved, zoo.MLP(in_features=6, hidden=10, depth=2, out_features=3))


def test_optimizer_state_errors(saved, tmp_path):
    net = fxwormhole.load(saved, _mlp())
    with pytest.raises(LoadError, match=r"holds the state of a SGD, not of a Adam"):
        fxwormhole.load_optimizer(saved, torch.optim.Adam(net.parameters()))
    with pytest.raises(LoadError, match=r"parameter groups of sizes \[\d+\], the optimizer has \[2\]"):
        fxwormhole.load_optimizer(saved, torch.optim.SGD(list(net.parameters())[:2], lr=0.1))
    fxwormhole.save(net, tmp_path / "no_opt")
    with pytest.raises(LoadError, match=r"holds no optimizer state; save with fxwormhole.save\(net, folder, optimizer=opt\)"):
        fxwormhole.load_optimizer(tmp_path / "no_opt", torch.optim.SGD(net.parameters(), lr=0.1))


def test_save_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"not a model returned by fxwormhole.transform"):
        fxwormhole.save(_mlp(), tmp_path / "plain")
    torch.manual_seed(0)
    net = fxwormhole.transform(_mlp(), (torch.randn(4, 6),))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaveError, match=r"it is a file, not a folder"):
        fxwormhole.save(net, tmp_path / "file")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs the safetensors package; install it with: pip install fxwormhole\[save\]"):
        fxwormhole.save(net, tmp_path / "m")


def test_an_interrupted_save_is_refused_at_load(saved):
    """Weights of a second save written, its config not (killed in between): checksums disagree."""
    net = fxwormhole.load(saved, _mlp())
    with torch.no_grad():
        net.head.weight.add_(1.0)
    config_before = (saved / CONFIG_FILE).read_bytes()
    fxwormhole.save(net, saved)
    (saved / CONFIG_FILE).write_bytes(config_before)
    with pytest.raises(LoadError, match=r"does not match the checksum .*a save was interrupted"):
        fxwormhole.load(saved, _mlp())


if __name__ == "__main__":  # rewrite the committed format-1 fixture (only when the format-1 writer changes)
    write_v1_fixture(FIXTURE_V1)
