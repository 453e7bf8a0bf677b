"""``fxwormhole zoo [NAME]``: the bundled models, their constructor arguments and example inputs."""
from __future__ import annotations

import argparse
import inspect

__all__ = ["register", "run", "input_spec", "constructor_arguments", "zoo_rows"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from . import SUMMARIES

    p = subparsers.add_parser(
        "zoo", help=SUMMARIES["zoo"],
        description="List the small models bundled in fxwormhole.zoo: the MODEL spec to pass to the other "
                    "commands, the --input of one example call (batch 4) and the constructor arguments (--kwargs) "
                    "with their defaults. With NAME, show that model's description and commands to try.",
        epilog="examples:\n  fxwormhole zoo\n  fxwormhole zoo CNN\n"
               "  fxwormhole inspect fxwormhole.zoo:CNN --input 4x1x12x12 --kwargs '{\"channels\": 4}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", nargs="?", help="one model (e.g. CNN): its description and commands")
    p.set_defaults(func=run)


def input_spec(tensor) -> str:
    """The ``--input`` spec of an example tensor: ``4x8``, ``int64:4x20:2``."""
    import torch

    dims = "x".join(str(int(d)) for d in tensor.shape)
    if tensor.dtype == torch.float32:
        return dims
    name = str(tensor.dtype).removeprefix("torch.")
    return f"{name}:{dims}" + ("" if tensor.dtype.is_floating_point or tensor.dtype == torch.bool else ":2")


def constructor_arguments(cls: type) -> str:
    """``hidden=16, depth=3, activation='tanh'``: the keyword arguments and their defaults."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    return ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in params)


def zoo_rows(batch: int = 4) -> list[tuple[str, str, str, str]]:
    """``(MODEL spec, --input flags, constructor arguments, first docstring line)`` of every zoo model."""
    from .. import zoo

    rows = []
    for name, cls in zoo.ZOO.items():
        inputs = " ".join(f"--input {input_spec(t)}" for t in zoo.example_inputs(name, batch=batch))
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        rows.append((f"fxwormhole.zoo:{name}", inputs, constructor_arguments(cls), doc))
    return rows


def run(args: argparse.Namespace) -> int:
    from .. import zoo
    from .._text import text_table
    from ..errors import ConfigError

    rows = zoo_rows()
    if args.name is None:
        print(text_table(("MODEL", "example input", "constructor arguments (--kwargs)"),
                         [r[:3] for r in rows], left=3))
        print("\nfxwormhole zoo NAME: one model's description; every model also builds with fxwormhole.zoo.build(NAME)")
        return 0
    match = [r for r in rows if r[0].endswith(f":{args.name}")]
    if not match:
        raise ConfigError(f"zoo NAME {args.name!r} is not a bundled model: expected one of {', '.join(zoo.ZOO)}")
    spec, inputs, kwargs, _ = match[0]
    doc = inspect.getdoc(zoo.ZOO[args.name]) or ""
    print(f"{spec}\n\n{doc}\n\nconstructor arguments: {kwargs}\nexample input:         {inputs}\n\ntry:")
    print(f"  fxwormhole inspect {spec} {inputs}")
    print(f"  fxwormhole rewrite {spec} {inputs} --open --out {args.name.lower()}.pt")
    return 0
