"""Shared by the benchmark scripts: print the readable lines, write the JSON."""

import json
from pathlib import Path


def emit(lines, out: dict, json_path) -> None:
    print("\n".join(lines))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {json_path}")
