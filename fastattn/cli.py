"""The ``fastattn`` command (also ``python -m fastattn``)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from .info import info, info_dict

    if args.json:
        print(json.dumps(info_dict(), indent=2))
    else:
        info()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastattn", description="fastattn: fused attention kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and which backends are usable here (and why not)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a report")
    p.set_defaults(func=_cmd_info)
    for register in _SUBCOMMANDS:
        register(sub)
    return parser


# Other modules add their subcommands here: each entry takes the subparsers object.
_SUBCOMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
