"""``fxwormhole rewrite MODEL --input SPEC --out FILE``: transform a model and save it.

Also home of what the pipeline commands (``compile``, ``export``, ``bench``) share: the wormhole
options, and reading ``MODEL_OR_FILE`` (a model spec, or a ``.pt`` file written by ``rewrite``).
"""
from __future__ import annotations

import argparse
import contextlib
import pickle
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .._atomic import atomic_write, check_target
from ..config import GATE_KINDS, GRAD_MODES, SALConfig, WormholeConfig
from ..errors import ConfigError, FxWormholeError
from .specs import load_model, parse_input_spec, positive_int

__all__ = ["register", "run", "add_model_arguments", "add_wormhole_arguments", "wormhole_config",
           "parse_wormhole", "load_model_or_file", "load_for_command", "parse_inputs", "check_inputs_fit", "inference"]

_MODEL_HELP = "path/to/file.py:Name or package.module:Name (class or factory)"
_FILE_SUFFIXES = (".pt", ".pth")


def add_model_arguments(p: argparse.ArgumentParser, *, files: bool) -> None:
    """MODEL (or MODEL_OR_FILE), ``--input`` and ``--kwargs``."""
    if files:
        p.add_argument("model", metavar="MODEL_OR_FILE",
                       help=f"{_MODEL_HELP}, or a .pt file written by 'fxwormhole rewrite'")
    else:
        p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--input", "-i", dest="inputs", metavar="SPEC", action="append", required=True,
                   help="one positional input per flag: [DTYPE:]DIMS[:HIGH], e.g. 4x8 or int64:8x20:100")
    p.add_argument("--kwargs", metavar="JSON", help="constructor keyword arguments as a JSON object")


def add_wormhole_arguments(p: argparse.ArgumentParser) -> None:
    """Where wormholes go and how fixed points are solved (used when MODEL is a spec)."""
    g = p.add_argument_group("wormholes (when MODEL is a spec)")
    g.add_argument("--wormhole", "-w", dest="wormholes", metavar="SRC:DST", action="append", type=parse_wormhole,
                   help="feed layer SRC's output back into layer DST's input (module paths, e.g. layers.2:layers.0); "
                        "repeat for several; default: the 'auto' policy")
    g.add_argument("--every", metavar="K", type=positive_int, help="a wormhole from every K-th main-path layer back K layers")
    g.add_argument("--gate", choices=GATE_KINDS, default="scalar", help="gate kind (default: scalar)")
    g.add_argument("--gate-init", type=float, default=-6.0, help="initial gate bias; -6 is nearly closed (default)")
    g.add_argument("--proj-init", choices=("zero", "normal"), default="zero",
                   help="projection init: zero = exactly the original model at start (default)")
    g.add_argument("--proj-std", type=float, default=1e-2, help="std of the projection when --proj-init normal")
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
    """The WormholeConfig (and SALConfig) the wormhole options describe."""
    if args.wormholes and args.every is not None:
        raise ConfigError("--wormhole and --every exclude each other: pick explicit pairs or every:K")
    placement = (list(args.wormholes) if args.wormholes
                 else f"every:{args.every}" if args.every is not None else "auto")
    config = WormholeConfig(wormholes=placement, gate=args.gate, gate_init=args.gate_init, proj_init=args.proj_init,
                            proj_std=args.proj_std, solver=args.solver, tol=args.tol, max_iter=args.max_iter,
                            grad=args.grad)
    sal = None
    if args.sal or args.sal_eta is not None:
        sal = SALConfig() if args.sal_eta is None else SALConfig(eta=args.sal_eta)
    return config, sal


def parse_inputs(specs: Sequence[str]) -> tuple[torch.Tensor, ...]:
    return tuple(parse_input_spec(s) for s in specs)


def _is_file_arg(text: str) -> bool:
    return Path(text).suffix in _FILE_SUFFIXES or (":" not in text and Path(text).is_file())


def load_saved(path: str) -> nn.Module:
    """A module saved by ``fxwormhole rewrite`` (``torch.save`` of the whole module)."""
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
def inference(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode under no_grad; every submodule's own mode is restored afterwards."""
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        with torch.no_grad():
            yield net
    finally:
        for m, training in modes.items():
            m.training = training


def check_inputs_fit(net: nn.Module, inputs: Sequence[torch.Tensor], source: str) -> None:
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


def load_model_or_file(args: argparse.Namespace, inputs: Sequence[torch.Tensor]) -> tuple[nn.Module, str]:
    """``(transformed model, how it was obtained)`` from MODEL_OR_FILE and the wormhole options."""
    if _is_file_arg(args.model):
        net = load_saved(args.model)
        check_inputs_fit(net, inputs, args.model)  # a spec is checked by transform itself
        return net, f"loaded {args.model}"
    from ..api import transform

    config, sal = wormhole_config(args)
    model = load_model(args.model, args.kwargs)
    return transform(model, tuple(inputs), config, sal=sal), f"transformed {args.model}"


def load_for_command(args: argparse.Namespace) -> tuple[tuple[torch.Tensor, ...], nn.Module]:
    """Parse ``--input``, load or transform MODEL_OR_FILE, print how; returns ``(inputs, model)``."""
    inputs = parse_inputs(args.inputs)
    net, how = load_model_or_file(args, inputs)
    print(how)
    return inputs, net


# ------------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rewrite", help="insert wormholes into a model and save the transformed module",
        description="Capture MODEL, insert gated wormholes wrapped in fixed-point nodes (and SAL probes with "
                    "--sal), print what was inserted and torch.save the whole transformed module to FILE.",
        epilog="example:\n  fxwormhole rewrite fxwormhole.zoo:MLP --input 4x8 --wormhole layers.2:layers.0 "
               "--gate-init 0 --proj-init normal --out mlp_wormhole.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, files=False)
    add_wormhole_arguments(p)
    p.add_argument("--out", "-o", metavar="FILE", required=True, help="where to save the transformed module (.pt)")
    p.set_defaults(func=run)


_SAVE_ADVICE = ("if the cause is a pickling error, the model holds an object torch.save cannot pickle (named in the "
                "cause): remove it or make it picklable; otherwise check free disk space and write permission in {dir}")


def run(args: argparse.Namespace) -> int:
    if Path(args.out).suffix not in _FILE_SUFFIXES:
        raise ConfigError(f"--out {args.out!r}: expected a .pt or .pth file")
    out = check_target(args.out, "the transformed model")  # before the work, not after it
    inputs = parse_inputs(args.inputs)
    net, how = load_model_or_file(args, inputs)
    summary = net.summary() if hasattr(net, "summary") else ""
    if hasattr(net, "fixed_point_modules") and not net.fixed_point_modules():
        print("note: no fixed-point node was inserted (no wormhole placed?)")
    with atomic_write(out, what="the transformed model", advice=_SAVE_ADVICE) as tmp:
        torch.save(net, tmp)
    print(f"{how}")
    print(summary)
    print(f"saved:      {out} (torch.save of the whole module; load with torch.load(path, weights_only=False))")
    return 0
