"""`edgeloop-runtime`: the runtime's one command line, the contract with the operator's templates.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`.
Only the module of the command being run is imported, so that the init container's `fetch` starts fast.
An image flavour may lack a command's dependencies (the serving images have no onnx for `federated`): the
command is then listed as missing, and running it says which image has it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("edgeloop_runtime.fetch", "fetch a model into the node cache and verify its sha256"),
    "serve": ("edgeloop_runtime.serve", "serve an ONNX model over the Open Inference Protocol v2"),
    "store": ("edgeloop_runtime.store", "run the content-addressed model store"),
    "federated": ("edgeloop_runtime.federated.cli", "federated training: aggregate | train"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or one with only `only`'s arguments loaded (the others still listed)."""
    parser = argparse.ArgumentParser(prog="edgeloop-runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and only != name:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            missing = f"not in this image ({error}); docs/images.md says which image has it"
            if only == name:
                parser.exit(1, f"edgeloop-runtime {name}: {missing}\n")
            sub.add_parser(name, help=f"{help_text} [{missing}]", description=help_text)
            continue
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
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
