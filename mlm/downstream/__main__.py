"""`python -m mlm.downstream <model dir> downstream=<task> [downstream.<key>=...]`: fine-tune a saved model on a
downstream task (mlm.downstream.evaluate) and print the result as JSON on stdout (progress on stderr).

Kept apart from the evaluation: it composes the config through mlm.cli, which itself imports mlm.downstream.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from mlm.config import DownstreamConfig, UserError
from mlm.downstream import evaluate, summary_line


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlm.downstream",
        description="Fine-tune a saved model on a downstream task (seeds, median accuracy); prints the result as JSON.")
    parser.add_argument("model", help="a saved model directory (a run's final/) or package:<module>/<subdir>")
    parser.add_argument("overrides", nargs="*", help="downstream=<task> and downstream.* settings, as for run.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = evaluate(args.model, compose_downstream(args.overrides))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


def compose_downstream(overrides: List[str]) -> DownstreamConfig:
    """The downstream group as run.py composes it, from downstream overrides only (the rest would be ignored here)."""
    from mlm.cli import check_override_keys, compose

    for arg in overrides:
        if arg.lstrip("+~").split("=")[0].split(".")[0].split("/")[0] != "downstream":
            raise UserError(f"{arg}: only downstream settings apply here (downstream=<task>, downstream.<key>=...)")
    check_override_keys(overrides)
    cfg = compose(overrides).downstream
    if cfg.kind == "none":
        raise UserError("choose a task: downstream=polarity (or sst2, mrpc, rte, or local with downstream.path=<file>)")
    return cfg


if __name__ == "__main__":
    raise SystemExit(main())
