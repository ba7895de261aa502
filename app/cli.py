"""The one ``edgezo`` command. Each package registers its subcommands; heavy imports happen inside handlers,
so ``edgezo --help`` and the edge subcommands work on an install without torch."""

from __future__ import annotations

import argparse
import importlib
import sys

from cloud.extras import MissingExtra

# (module, function) pairs that add subcommands to the parser: the CLI as a table.
REGISTRARS: list[tuple[str, str]] = [
    ("convert.cli", "register"),
    ("edge.commands", "register"),
    ("app.benches", "register"),
    ("cloud.cli", "register"),
    ("app.demo", "register"),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``edgezo`` parser with every package's subcommands."""
    parser = argparse.ArgumentParser(
        prog="edgezo",
        description="Fine-tune language models on devices too small for backprop: zeroth-order adapter "
        "training through llama.cpp, guided by a cloud running torch backprop.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, func in REGISTRARS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a package whose module is not written yet, or a missing extra
            if e.name and e.name.startswith(module.split(".")[0]):
                continue
            raise
        getattr(mod, func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgezo`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MissingExtra as e:
        print(f"edgezo: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
