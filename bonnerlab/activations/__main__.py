"""`python -m bonnerlab.activations {finalize,info,layers,verify} STORE`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from bonnerlab.activations.reader import store_info, stored_layers
from bonnerlab.activations.store import finalize, verify
from bonnerlab.errors import StoreError, UserError


@dataclass
class StoreCommand:
    """An activation store a command works on."""

    # the zarr store (a folder jobs/extract.py writes)
    store: str = field(metadata={"positional": True, "custom_args": {"metavar": "STORE"}})


# subcommand -> its one-line help
COMMANDS = {
    "finalize": "mark a store complete once every chunk is written (what the last shard does)",
    "info": "the store's metadata as JSON: stimuli, layers, shapes, whether it is complete",
    "layers": "the names of the layers it holds, one a line",
    "verify": "read every chunk: present, checksum, decodes; lengths, unique ids in order, NaN "
    "only in skipped rows (a JSON report; exit 2 and the first problem when damaged)",
}


def parse(argv: list[str]) -> tuple[str, StoreCommand]:
    import simple_parsing

    parser = simple_parsing.ArgumentParser(
        prog="python -m bonnerlab.activations", description=__doc__, add_config_path_arg=False
    )
    # argparse's subparsers: every command takes the same StoreCommand
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, parser_class=simple_parsing.ArgumentParser
    )
    for name, help_text in COMMANDS.items():
        commands.add_parser(name, help=help_text, description=help_text).add_arguments(
            StoreCommand, dest="cfg"
        )
    args = parser.parse_args(argv)  # bad usage: argparse's usage line, exit 2
    return args.command, args.cfg


def main(argv: list[str]) -> int:
    command, cfg = parse(argv)
    try:
        if command == "finalize":
            print(json.dumps(finalize(cfg.store)))
        elif command == "layers":
            print("\n".join(stored_layers(cfg.store)))
        elif command == "verify":
            report = verify(cfg.store)
            print(json.dumps(report, indent=1))
            if report["problems"]:
                raise StoreError(
                    f"{report['problems'][0]} ({report['n_problems']} problems in all; rerun "
                    "the extraction with the same config to rewrite the damaged chunks)"
                )
        else:
            info = store_info(cfg.store)
            print(
                json.dumps(
                    {k: v for k, v in info.items() if k != "skipped_stimuli"}, indent=1, default=str
                )
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
