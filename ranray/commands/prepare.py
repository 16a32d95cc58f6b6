"""`ranray prepare`: a raw dataset -> aligned Parquet shards, rejects and a manifest (Ray Data + dlib).

    ranray prepare --config jobs/prepare_ferplus.yaml [key=value ...]
    ranray prepare ferplus data/FERPlus --out data/ferplus_prepared [--overwrite] [label_mode=probability]
"""

from __future__ import annotations

import argparse
import json
import re

HELP = "align a raw dataset (ferplus, rafdb, affectnet, imagefolder, identity, recordio) into Parquet shards"
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # key=value, as opposed to an input path


def _options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="a prepare job YAML (PrepareConfig)")
    parser.add_argument("--out", help="output folder (config key out)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _options(parser)
    # REMAINDER, re-parsed in run(): options may sit between SOURCE INPUT... and key=value items,
    # which a plain nargs="*" positional refuses.
    parser.add_argument("items", nargs=argparse.REMAINDER, metavar="SOURCE INPUT... | key=value",
                        help="the source and its input files or folders, then config overrides such as "
                             "label_mode=probability detector=hog num_workers=2 subset_lists.occlusion=FILE")


def parse_items(args: argparse.Namespace) -> argparse.Namespace:
    """Options found among the items join those given before them."""
    parser = _options(argparse.ArgumentParser(prog="ranray prepare", add_help=False))
    parser.add_argument("items", nargs="*")
    rest = parser.parse_intermixed_args(args.items)
    return argparse.Namespace(config=rest.config or args.config, out=rest.out or args.out,
                              overwrite=rest.overwrite or args.overwrite, items=rest.items)


def overrides_from(args: argparse.Namespace) -> list[str]:
    """Positional SOURCE INPUT... and the flags, as key=value overrides (JSON values: any path is safe)."""
    args = parse_items(args)
    plain = [i for i in args.items if not OVERRIDE.match(i)]
    out = [i for i in args.items if OVERRIDE.match(i)]
    if plain:
        out.append(f"source={plain[0]}")
        if plain[1:]:
            out.append(f"inputs={json.dumps(plain[1:])}")
    if args.out:
        out.append(f"out={json.dumps(args.out)}")
    if args.overwrite:
        out.append("overwrite=true")
    return out


def run(args: argparse.Namespace) -> int:
    from ranray.config import PrepareConfig, load_config
    from ranray.data.prepare import prepare

    cfg = load_config(PrepareConfig, parse_items(args).config, overrides_from(args))
    summary = prepare(cfg, progress=lambda line: print(line, flush=True))
    print(summary.line())
    return 0
