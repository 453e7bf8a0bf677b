import pytest

import fxwormhole as fw
from fxwormhole.config import coerce_grad, coerce_solver


def test_defaults_resolve_names():
    cfg = fw.WormholeConfig()
    assert isinstance(cfg.solver, fw.SolverConfig) and cfg.solver.name == "anderson"
    assert isinstance(cfg.grad, fw.GradConfig) and cfg.grad.mode == "implicit"


def test_tol_and_max_iter_override_solver():
    cfg = fw.WormholeConfig(solver="picard", tol=1e-3, max_iter=7)
    assert (cfg.solver.name, cfg.solver.tol, cfg.solver.max_iter) == ("picard", 1e-3, 7)


def test_explicit_pairs_are_normalised_to_tuples():
    cfg = fw.WormholeConfig(wormholes=[["fc3", "fc1"]])
    assert cfg.wormholes == (("fc3", "fc1"),)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"wormholes": "every:0"}, "wormholes"),
        ({"wormholes": []}, "wormholes"),
        ({"wormholes": [("a",)]}, "wormholes"),
        ({"gate": "vector"}, "gate"),
        ({"gate_init": float("nan")}, "gate_init"),
        ({"on_fail": "explode"}, "on_fail"),
        ({"tol": -1.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"grad": "magic"}, "mode"),
        ({"gate_cap": 2.0}, "gate_cap"),
    ],
)
def test_bad_wormhole_config_names_the_field(kwargs, field):
    with pytest.raises(fw.ConfigError, match=field):
        fw.WormholeConfig(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (fw.SolverConfig, {"damping": 0.0}, "damping"),
        (fw.SolverConfig, {"halting": "never"}, "halting"),
        (fw.SolverConfig, {"memory": 0}, "memory"),
        (fw.GradConfig, {"tau": 1.5}, "tau"),
        (fw.SALConfig, {"beta": 1.0}, "beta"),
        (fw.SALConfig, {"eta": -1.0}, "eta"),
    ],
)
def test_bad_configs_name_the_field(cls, kwargs, field):
    with pytest.raises(fw.ConfigError, match=field):
        cls(**kwargs)


def test_coerce_rejects_wrong_types():
    with pytest.raises(fw.ConfigError):
        coerce_solver(3)
    with pytest.raises(fw.ConfigError):
        coerce_grad(object())


def test_config_error_is_a_value_error_and_fxwormhole_error():
    assert issubclass(fw.ConfigError, fw.FxWormholeError) and issubclass(fw.ConfigError, ValueError)
