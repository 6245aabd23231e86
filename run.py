"""Entry point: `python run.py [group=option ...] [key=value ...]` (add -m for a sweep).

Hydra composes conf/ -> one typed Config -> mlm.train.train() in the job's run directory.
See README.md for the config groups and common overrides.
"""

import sys

import hydra
from omegaconf import DictConfig

from mlm.cli import register, run_job
from mlm.errors import exit_on_user_error
from mlm.job import Rendezvous
from mlm.overrides import check_override_keys

register()
rendezvous = Rendezvous()  # this process's link to its launcher's store: the jobs of a multirun run here one by one


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg, rendezvous)  # eval perplexity: what Optuna minimises


if __name__ == "__main__":
    with exit_on_user_error():
        check_override_keys(sys.argv[1:])
    main()
