"""`python -m bonnerlab.data pack FOLDER_OR_SHEET OUT [--shard_size 1000]`, `... verify OUT`.

pack: an image folder (training's root/<class>/... or root/train/<class>/... layout, or any
stimulus folder) or a .csv/.tsv stimulus sheet -> tar shards in WebDataset's layout plus
OUT/index.json (see bonnerlab/data/shards.py). Train from it with `--data.dataset shards
--data.root OUT`, extract with `--stimuli OUT`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from bonnerlab.errors import UserError


@dataclass
class PackCommand:
    """Pack an image set into shards."""

    # an image folder, or a .csv/.tsv sheet with a `path` column
    source: str = field(
        metadata={"positional": True, "custom_args": {"metavar": "FOLDER_OR_SHEET"}}
    )
    # the folder to write: shard-000000.tar, ... and index.json
    out: str = field(metadata={"positional": True, "custom_args": {"metavar": "OUT"}})
    # images per shard: one file opened per this many images when reading
    shard_size: int = 1000
    # replace OUT if it exists (the old set is removed only once the new one is complete)
    overwrite: bool = False


@dataclass
class VerifyCommand:
    """Check every image of a shard set against its sha256 in the index."""

    # a folder `pack` wrote
    out: str = field(metadata={"positional": True, "custom_args": {"metavar": "OUT"}})


COMMANDS = {
    "pack": (PackCommand, "write an image folder or a stimulus sheet as tar shards + index"),
    "verify": (VerifyCommand, "read every image of a shard set and check its sha256"),
}


def parse(argv: list[str]) -> tuple[str, PackCommand | VerifyCommand]:
    import simple_parsing

    parser = simple_parsing.ArgumentParser(
        prog="python -m bonnerlab.data", description=__doc__, add_config_path_arg=False
    )
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, parser_class=simple_parsing.ArgumentParser
    )
    for name, (kind, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, description=help_text).add_arguments(
            kind, dest="cfg"
        )
    args = parser.parse_args(argv)  # bad usage: argparse's usage line, exit 2
    return args.command, args.cfg


def main(argv: list[str]) -> int:
    from bonnerlab.data import shards

    command, cfg = parse(argv)
    try:
        if command == "pack":
            assert isinstance(cfg, PackCommand)
            result = shards.pack(cfg.source, cfg.out, cfg.shard_size, cfg.overwrite)
        else:
            result = shards.verify(cfg.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
