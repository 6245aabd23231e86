"""`python -m mlm.downstream <model dir> downstream=<task> [downstream.<key>=...] [model.trust_remote_code=true]`: fine-tune
a saved model on a downstream task (mlm.downstream.evaluate) and print the result as JSON on stdout (progress on stderr).
A model folder's own Python (an auto_map) runs only with model.trust_remote_code=true on this command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional, Tuple

from mlm.config import DownstreamConfig, UserError
from mlm.downstream import evaluate, summary_line
from mlm.errors import exit_code
from mlm.overrides import check_override_keys, compose


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlm.downstream",
        description="Fine-tune a saved model on a downstream task (seeds, median accuracy); prints the result as JSON.",
    )
    parser.add_argument("model", help="a saved model directory (a run's final/) or package:<module>/<subdir>")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="downstream=<task> and downstream.* settings, as for run.py; "
        "model.trust_remote_code=true runs the model folder's own code (read it first)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return exit_code(lambda: print_result(args.model, args.overrides))


def print_result(model: str, overrides: List[str]) -> None:
    """The task's result as JSON on stdout, its summary line on stderr."""
    cfg, trust_remote_code = compose_downstream(overrides)
    result = evaluate(model, cfg, trust_remote_code=trust_remote_code)
    print(summary_line(result), file=sys.stderr)
    print(json.dumps(result, indent=2))


def compose_downstream(overrides: List[str]) -> Tuple[DownstreamConfig, bool]:
    """The downstream group as run.py composes it, and model.trust_remote_code (off unless given here), from those
    overrides only (the rest would be ignored here)."""
    for arg in overrides:
        key = arg.lstrip("+~").split("=")[0]
        if key.split(".")[0].split("/")[0] != "downstream" and key != "model.trust_remote_code":
            raise UserError(
                f"{arg}: only downstream settings apply here (downstream=<task>, downstream.<key>=..., "
                "and model.trust_remote_code)"
            )
    check_override_keys(overrides)
    cfg = compose(overrides)
    if cfg.downstream.kind == "none":
        raise UserError("choose a task: downstream=polarity (or sst2, mrpc, rte, or local with downstream.path=<file>)")
    return cfg.downstream, cfg.model.trust_remote_code


if __name__ == "__main__":
    raise SystemExit(main())
