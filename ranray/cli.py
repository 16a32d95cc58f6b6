"""`ranray <verb>`: one module per verb in ranray/commands, found at start-up.

Each command module defines HELP (one line), add_arguments(parser) and run(args) -> int, and
imports its heavy dependencies inside run(), so that `ranray --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ranray import commands
from ranray.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ranray",
        description="Region Attention Network training for facial expression recognition, on Ray.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        sub = verbs.add_parser(info.name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ranray.failures import RunFailed

    try:
        return int(args._run(args) or 0)
    except ConfigError as err:
        print(f"ranray {args.verb}: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"ranray {args.verb}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
