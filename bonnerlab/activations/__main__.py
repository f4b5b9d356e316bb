"""`python -m bonnerlab.activations {finalize,info,layers} STORE`."""

from __future__ import annotations

import json
import sys

from bonnerlab.activations.reader import store_info, stored_layers
from bonnerlab.activations.store import finalize
from bonnerlab.errors import UserError


def main(argv: list[str]) -> int:
    usage = "usage: python -m bonnerlab.activations {finalize,info,layers} STORE"
    if len(argv) != 2 or argv[0] not in ("finalize", "info", "layers"):
        print(usage, file=sys.stderr)
        return 2
    command, path = argv
    try:
        if command == "finalize":
            print(json.dumps(finalize(path)))
        elif command == "layers":
            print("\n".join(stored_layers(path)))
        else:
            info = store_info(path)
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
