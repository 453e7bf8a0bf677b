"""``fxwormhole rewrite MODEL --input SPEC --out FILE``: transform a model and save it.

Also home of what the pipeline commands (``compile``, ``export``, ``bench``) share: the wormhole
options, and reading ``MODEL_OR_FILE`` (a model spec, or a ``.pt`` file written by ``rewrite``).
torch is imported when a command runs, not when its parser is built.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..config import GATE_KINDS, GRAD_MODES, SALConfig, WormholeConfig
from ..errors import ConfigError, FxWormholeError
from ._progress import Progress
from .specs import load_model, parse_input_spec, positive_int

__all__ = ["register", "run", "add_model_arguments", "add_wormhole_arguments", "add_quiet_argument", "wormhole_config",
           "parse_wormhole", "load_model_or_file", "load_for_command", "parse_inputs", "check_inputs_fit", "inference",
           "CLOSED", "OPEN"]

_MODEL_HELP = "path/to/file.py:Name or package.module:Name (class or factory)"
_FILE_SUFFIXES = (".pt", ".pth")

#: ``--open``: gates half open and a small random projection, so the fixed point iterates from the first call
#: (a round trip then checks a model that differs from the original) while the feedback gain stays well below
#: 1 (contractive). Not spectral_norm: torch.save cannot write parametrized modules, and rewrite uses it.
#: The contraction regulariser keeps it contractive while it trains (WormholeConfig.active's, weight 1).
OPEN: dict[str, Any] = {"gate_init": 0.0, "proj_init": "normal", "proj_std": 0.05, "spectral_norm": False,
                        "contraction": 1.0}
#: without ``--open``: WormholeConfig's defaults (gates nearly closed, zero projection: the original model)
CLOSED: dict[str, Any] = {key: WormholeConfig.__dataclass_fields__[key].default for key in OPEN}


def add_model_arguments(p: argparse.ArgumentParser, *, files: bool) -> None:
    """MODEL (or MODEL_OR_FILE), ``--input`` and ``--kwargs``."""
    if files:
        p.add_argument("model", metavar="MODEL_OR_FILE",
                       help=f"{_MODEL_HELP}, or a .pt file written by 'fxwormhole rewrite'")
    else:
        p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--input", "-i", dest="inputs", metavar="SPEC", action="append", required=True,
                   help="one positional input per flag: [DTYPE:]DIMS[:HIGH], e.g. 4x8 or int64:8x20:100 "
                        "('fxwormhole zoo' lists the bundled models' inputs)")
    p.add_argument("--kwargs", metavar="JSON", help="constructor keyword arguments as a JSON object")


def add_quiet_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress line on stderr (it is shown only on a terminal, for steps over a second)")


def add_wormhole_arguments(p: argparse.ArgumentParser) -> None:
    """Where wormholes go and how fixed points are solved (used when MODEL is a spec)."""
    g = p.add_argument_group("wormholes (when MODEL is a spec)")
    g.add_argument("--wormhole", "-w", dest="wormholes", metavar="SRC:DST", action="append", type=parse_wormhole,
                   help="feed layer SRC's output back into layer DST's input (module paths, e.g. layers.2:layers.0); "
                        "repeat for several; default: the 'auto' policy")
    g.add_argument("--every", metavar="K", type=positive_int, help="a wormhole from every K-th main-path layer back K layers")
    g.add_argument("--open", action="store_true",
                   help="start with the wormholes open and contractive (gate-init 0, proj-init normal, proj-std 0.05, and the "
                        "contraction regulariser at weight 1 while training), "
                        "so the fixed point iterates from the first call; the options below override it")
    g.add_argument("--gate", choices=GATE_KINDS, default="scalar", help="gate kind (default: scalar)")
    g.add_argument("--gate-init", type=float, help="initial gate bias (default -6: nearly closed; --open: 0)")
    g.add_argument("--gate-cap", type=float, help="upper bound of every gate, in (0, 1] (a divergence guard)")
    g.add_argument("--proj-init", choices=("zero", "normal"),
                   help="projection init (default zero: exactly the original model at start; --open: normal)")
    g.add_argument("--proj-std", type=float, help="std of the projection when --proj-init normal (default 0.01; --open: 0.05)")
    g.add_argument("--spectral-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="cap the projection's spectral norm at 1 (default off; not with rewrite: torch.save cannot "
                        "write the parametrized projection)")
    g.add_argument("--solver", default="anderson", help="fixed-point solver: picard, damped, anderson (default)")
    g.add_argument("--tol", type=float, help="fixed-point tolerance")
    g.add_argument("--max-iter", type=int, help="fixed-point iteration cap")
    g.add_argument("--grad", choices=GRAD_MODES, default="implicit", help="gradient mode (default: implicit)")
    g.add_argument("--sal", action="store_true", help="also insert sensitivity probes and SAL")
    g.add_argument("--sal-eta", type=float, help="SAL step size (implies --sal)")


def parse_wormhole(text: str) -> tuple[str, str]:
    """``"layers.2:layers.0"`` -> ``("layers.2", "layers.0")`` (argparse type; errors are one line)."""
    src, sep, dst = text.partition(":")
    if not sep or not src.strip() or not dst.strip() or ":" in dst:
        raise argparse.ArgumentTypeError(f"--wormhole {text!r}: expected SRC:DST with two module paths, "
                                         "e.g. layers.2:layers.0")
    return src.strip(), dst.strip()


def wormhole_config(args: argparse.Namespace) -> tuple[WormholeConfig, SALConfig | None]:
    """The WormholeConfig (and SALConfig) the wormhole options describe (``--open`` or the closed
    defaults, then every option given explicitly)."""
    if args.wormholes and args.every is not None:
        raise ConfigError("--wormhole and --every exclude each other: pick explicit pairs or every:K")
    placement = (list(args.wormholes) if args.wormholes
                 else f"every:{args.every}" if args.every is not None else "auto")
    start = OPEN if getattr(args, "open", False) else CLOSED
    chosen = {key: getattr(args, key, None) for key in start}
    init = {key: start[key] if value is None else value for key, value in chosen.items()}
    config = WormholeConfig(wormholes=placement, gate=args.gate, solver=args.solver, tol=args.tol,
                            max_iter=args.max_iter, grad=args.grad, gate_cap=getattr(args, "gate_cap", None), **init)
    sal = None
    if args.sal or args.sal_eta is not None:
        sal = SALConfig() if args.sal_eta is None else SALConfig(eta=args.sal_eta)
    return config, sal


def parse_inputs(specs: Sequence[str]) -> tuple:
    return tuple(parse_input_spec(s) for s in specs)


def _is_file_arg(text: str) -> bool:
    return Path(text).suffix in _FILE_SUFFIXES or (":" not in text and Path(text).is_file())


def load_saved(path: str):
    """A module saved by ``fxwormhole rewrite`` (``torch.save`` of the whole module)."""
    import pickle
    import zipfile

    import torch
    from torch import nn

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model file {path!r} does not exist; write one with 'fxwormhole rewrite MODEL --out {path}'")
    try:
        model = torch.load(file, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, AttributeError,
            ModuleNotFoundError) as exc:
        raise ConfigError(f"model file {path!r} is not a model saved by 'fxwormhole rewrite' "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model file {path!r} holds a {type(model).__name__}, not an nn.Module "
                          "(a state_dict?); save the whole module, as 'fxwormhole rewrite' does")
    return model


def _shapes(shapes: Sequence[Sequence[int]]) -> str:
    return " ".join(f"--input {'x'.join(map(str, s))}" for s in shapes)


@contextlib.contextmanager
def inference(net) -> Iterator:
    """``net`` in eval mode under no_grad; every submodule's own mode is restored afterwards."""
    import torch

    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        with torch.no_grad():
            yield net
    finally:
        for m, training in modes.items():
            m.training = training


def check_inputs_fit(net, inputs: Sequence, source: str) -> None:
    """Run ``net`` once (see :func:`inference`) so that inputs it cannot take fail here as one
    ConfigError, not deep inside torch.compile or torch.export."""
    try:
        with inference(net):
            net(*inputs)
    except FxWormholeError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the model raises for inputs it cannot take
        built = getattr(net, "meta", {}).get("fxwormhole", {}).get("input_shapes")
        hint = (f"it was transformed with {_shapes(built)}: pass inputs of those shapes (any batch size)"
                if built else "pass inputs that the model accepts")
        raise ConfigError(f"{_shapes(t.shape for t in inputs)} does not fit the model in {source} "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); {hint}") from None


def load_model_or_file(args: argparse.Namespace, inputs: Sequence, progress: Progress | None = None) -> tuple[Any, str]:
    """``(transformed model, how it was obtained)`` from MODEL_OR_FILE and the wormhole options."""
    progress = progress or Progress(quiet=True)
    if _is_file_arg(args.model):
        with progress.step(f"loading {args.model}"):
            net = load_saved(args.model)
            check_inputs_fit(net, inputs, args.model)  # a spec is checked by transform itself
        return net, f"loaded {args.model}"
    from ..api import transform

    config, sal = wormhole_config(args)
    with progress.step(f"building {args.model}"):
        model = load_model(args.model, args.kwargs)
    with progress.step("capturing and transforming the model"):
        net = transform(model, tuple(inputs), config, sal=sal)
    return net, f"transformed {args.model}"


def load_for_command(args: argparse.Namespace, progress: Progress | None = None) -> tuple[tuple, Any]:
    """Parse ``--input``, load or transform MODEL_OR_FILE, print how; returns ``(inputs, model)``."""
    inputs = parse_inputs(args.inputs)
    net, how = load_model_or_file(args, inputs, progress)
    print(how)
    return inputs, net


# ------------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    from . import SUMMARIES

    p = subparsers.add_parser(
        "rewrite", help=SUMMARIES["rewrite"],
        description="Capture MODEL, insert gated wormholes wrapped in fixed-point nodes (and SAL probes with "
                    "--sal), print what was inserted (each wormhole's source and destination, how its shape is "
                    "bridged, its gate; the probes) and torch.save the whole transformed module to FILE.",
        epilog="examples:\n"
               "  fxwormhole rewrite fxwormhole.zoo:MLP --input 4x8 --wormhole layers.2:layers.0 --out mlp_wormhole.pt\n"
               "  fxwormhole rewrite fxwormhole.zoo:CNN --input 2x1x12x12 --open --sal --out cnn.pt\n"
               "  fxwormhole rewrite my_models.py:Net --kwargs '{\"width\": 7}' --input 4x3 --gate-init 0 "
               "--proj-init normal --out net.pt\n"
               "load the file with torch.load(FILE, weights_only=False); for a portable save use fxwormhole.save",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, files=False)
    add_wormhole_arguments(p)
    p.add_argument("--out", "-o", metavar="FILE", required=True, help="where to save the transformed module (.pt)")
    add_quiet_argument(p)
    p.set_defaults(func=run)


_SAVE_ADVICE = ("if the cause is a pickling error, the model holds an object torch.save cannot pickle (named in the "
                "cause): remove it or make it picklable; otherwise check free disk space and write permission in {dir}")


def run(args: argparse.Namespace) -> int:
    import torch

    from .._atomic import atomic_write, check_target
    from ..describe import probe_line, wormhole_lines

    if Path(args.out).suffix not in _FILE_SUFFIXES:
        raise ConfigError(f"--out {args.out!r}: expected a .pt or .pth file")
    if args.spectral_norm:
        raise ConfigError("--spectral-norm: torch.save cannot write a spectrally normalised projection (a torch "
                          "parametrization); pass MODEL with --spectral-norm to compile, export or bench directly, "
                          "or save from Python with fxwormhole.save(net, folder)")
    out = check_target(args.out, "the transformed model")  # before the work, not after it
    progress = Progress(args.quiet)
    inputs = parse_inputs(args.inputs)
    net, how = load_model_or_file(args, inputs, progress)
    summary = net.summary() if hasattr(net, "summary") else ""
    if hasattr(net, "fixed_point_modules") and not net.fixed_point_modules():
        print("note: no fixed-point node was inserted (no wormhole placed?)")
    with progress.step(f"saving {out}"), atomic_write(out, what="the transformed model", advice=_SAVE_ADVICE) as tmp:
        torch.save(net, tmp)
    print(f"{how}")
    print(summary)
    print("\n".join(wormhole_lines(net)))
    print(probe_line(net))
    print(f"saved:      {out} (torch.save of the whole module; load with torch.load(path, weights_only=False))")
    return 0
