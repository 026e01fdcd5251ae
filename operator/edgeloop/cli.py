"""`edgeloop`: the operator's command line.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`;
only the chosen one is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("edgeloop.operator_main", "run the operator (kopf) with JSON logs and a liveness endpoint"),
    "infer": ("edgeloop.infer", "send one input to a model endpoint with tritonclient and print the result"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only=chosen).parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
