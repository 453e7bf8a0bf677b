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


# --------------------------------------------------------------- the validation contract (issue 13 row 13)
# docs/api.md, "When a configuration is checked": what a config can check alone is checked when it is
# built; solver names against the registry of that moment, and again when transform uses the config.
import pickle  # noqa: E402

from fxwormhole.runtime import solvers  # noqa: E402
from fxwormhole.runtime.fixed_point import FixedPoint  # noqa: E402


@pytest.mark.parametrize("build, field", [
    (lambda: fw.SolverConfig(name="newton"), "SolverConfig.name='newton'"),
    (lambda: fw.GradConfig(solver="cg"), "GradConfig.solver='cg'"),
    (lambda: fw.WormholeConfig(solver="newton"), "SolverConfig.name='newton'"),
    (lambda: fw.WormholeConfig(grad=fw.GradConfig(solver="cg")), "GradConfig.solver='cg'"),
    (lambda: coerce_solver("newton"), "SolverConfig.name='newton'"),
    (lambda: FixedPoint(lambda z, x: z, solver="newton"), "SolverConfig.name='newton'"),
], ids=["SolverConfig", "GradConfig", "WormholeConfig solver", "WormholeConfig grad", "coerce_solver", "FixedPoint"])
def test_unknown_solver_names_are_refused_when_the_config_is_built(build, field):
    with pytest.raises(fw.ConfigError) as info:
        build()
    message = str(info.value)
    assert field in message and "unknown solver" in message and "register_solver" in message, message
    assert all(repr(name) in message for name in ("anderson", "damped", "picard")), message


def test_a_solver_registered_first_can_be_named(monkeypatch):
    monkeypatch.setitem(solvers._REGISTRY, "picard_again", solvers.Picard)  # removed again after the test
    cfg = fw.WormholeConfig(solver="picard_again", grad=fw.GradConfig(solver="picard_again"))
    assert (cfg.solver.name, cfg.grad.solver) == ("picard_again", "picard_again")


def test_transform_checks_solver_names_again_before_any_work(monkeypatch):
    """A config checked when it was built can still name a solver the registry lacks when it is used:
    one unpickled in a process that has not registered it yet (unpickling skips the checks)."""
    monkeypatch.setitem(solvers._REGISTRY, "mine", solvers.Picard)
    saved = pickle.dumps(fw.WormholeConfig(solver="mine"))
    monkeypatch.delitem(solvers._REGISTRY, "mine")
    cfg = pickle.loads(saved)  # no error here: nothing runs when a frozen dataclass is unpickled
    monkeypatch.setattr("fxwormhole.api.capture_graph", _fail("transform captured before checking the config"))
    with pytest.raises(fw.ConfigError) as info:
        fw.transform(fw.zoo.MLP(), fw.zoo.example_inputs("MLP"), cfg)
    message = str(info.value)
    assert "SolverConfig.name='mine'" in message and "register_solver" in message, message


def _fail(why: str):
    def fail(*args, **kwargs):
        raise AssertionError(why)
    return fail


@pytest.mark.parametrize("cls, kwargs, field, allowed", [
    (fw.WormholeConfig, {"spectral_norm": "yes"}, "spectral_norm", "True or False"),
    (fw.SALConfig, {"two_sided": 1}, "two_sided", "True or False"),
    (fw.SALConfig, {"log_form": None}, "log_form", "True or False"),
    (fw.SALConfig, {"recurrent_only": "no"}, "recurrent_only", "True or False"),
    (fw.SALConfig, {"enabled": 0}, "enabled", "True or False"),
    (fw.SolverConfig, {"damping": True}, "damping", "a float in (0, 1]"),
    (fw.SolverConfig, {"regularization": float("inf")}, "regularization", "a finite float >= 0"),
    (fw.GradConfig, {"tau": True}, "tau", "a float in (0, 1]"),
    (fw.SALConfig, {"beta": float("nan")}, "beta", "a float in [0, 1)"),
    (fw.WormholeConfig, {"gate_init": True}, "gate_init", "a finite float"),
    (fw.WormholeConfig, {"gate_cap": True}, "gate_cap", "None or a float in (0, 1]"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_field_a_config_can_check_alone_is_checked_when_it_is_built(cls, kwargs, field, allowed):
    with pytest.raises(fw.ConfigError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert f"{cls.__name__}.{field}=" in message and allowed in message, message


def test_the_builtin_names_are_the_registry_s():
    from fxwormhole.config import BUILTIN_SOLVERS

    assert set(solvers.available_solvers()) >= set(BUILTIN_SOLVERS)
