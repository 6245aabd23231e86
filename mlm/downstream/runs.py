"""A finished run asked again for downstream numbers its results.json lacks: they are added to it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from mlm.config import DownstreamConfig, UserError
from mlm.downstream.protocol import evaluate
from mlm.downstream.tasks import task_name
from mlm.preemption import Interrupted, StopSignals

log = logging.getLogger(__name__)


def add_to_finished_run(
    run_dir: Path, cfg: DownstreamConfig, settings: Optional[dict], results: dict, trust_remote_code: bool = False
) -> dict:
    """A finished run asked again with downstream settings its results.json has no numbers for (none yet, or
    another task): fine-tune its final/ now, and rewrite results.json with them (the "downstream" record and the
    config's downstream.* keys: the ones asked). Main process only, under the run's lock. Returns the results.
    `trust_remote_code`: this command line's model.trust_remote_code (the run's own model may ship code)."""
    from mlm import rundir

    asked = {k: v for k, v in (settings or {}).items() if k.startswith("downstream.")}
    saved = {k: v for k, v in results.get("config", {}).items() if k.startswith("downstream.")}
    if cfg.kind == "none" or ("downstream" in results and asked == saved):
        return results
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise UserError(
            f"{run_dir} is finished but has no final/ model to fine-tune (trained with trainer.save_model=false); "
            "train it again in a run directory of its own (hydra.run.dir=<new dir>)"
        )
    if "downstream" in results:
        log.warning(
            "%s: replacing its downstream result for %s with one for %s",
            run_dir,
            results["downstream"].get("task"),
            task_name(cfg),
        )
    # a stop signal ends the fine-tune at its next step (one line), results.json as it was
    stop = StopSignals(plan="stopping the downstream fine-tune at its next step; results.json stays as it is").install()
    try:
        scores = evaluate(final, cfg, trust_remote_code=trust_remote_code)
    except Interrupted as e:
        raise Interrupted(
            e.signum,
            f"{e}; {Path(run_dir) / 'results.json'} is unchanged; add the downstream numbers "
            f"with: {rundir.resume_command(run_dir)}",
        ) from None
    finally:
        stop.restore()
    results = {**results, "downstream": scores, "config": {**results.get("config", {}), **asked}}
    rundir.write_results(run_dir, results)
    (Path(run_dir) / "error.txt").unlink(missing_ok=True)  # a failed earlier try of this (a sweep job's record)
    return results
