"""What run.py does around training: resolvers, the config snapshot, the run-dir decision, failures, the summary."""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mlm import preemption
from mlm.config import Config, Resumable, UserError, register_configs
from mlm.errors import error_code, exit_on_user_error, stderr
from mlm.files import NOFOLLOW, atomic_write_text, open_append
from mlm.job import Job, PeerFailed, Rendezvous
from mlm.placement import detect, is_main_process, launch_name
from mlm.preemption import Interrupted
from mlm.rundir import RunDirLocked, finished_line, guard, lock_run_dir, release_run_dir, resume_command, resume_note

log = logging.getLogger("mlm")


def launch_stamp(*, _root_: Optional[DictConfig] = None) -> str:
    """The default run (or sweep) directory's name: a timestamp shared by all processes of one launch on one node,
    or, for a single run with resume=auto, the unfinished default run this same command started (resume_unfinished).

    torchrun and `accelerate launch` start every rank from one launcher process, so its start time
    is common to all of them; a plain `python run.py` uses its own start time. The tasks of one
    SLURM job (on several nodes) use its job id instead: their start times differ.
    Decided once per process (Hydra resolves the run dir more than once).
    """
    with exit_on_user_error():  # in a resolver: Hydra would wrap it in its own error (exit code 1)
        name = launch_name()
    if name:
        return name
    key = _stamp_key(_root_)
    if key not in _stamps:
        _stamps[key] = resume_unfinished(_root_, start_stamp()) if key[0] else start_stamp()
    return _stamps[key]


_stamps: Dict[tuple, str] = {}  # launch_stamp's decisions in this process


def _stamp_key(root: Optional[DictConfig]) -> tuple:
    """(whether a default run dir may resume an unfinished run, the command's overrides, the working directory)."""
    from hydra.types import RunMode

    hydra = root.get("hydra") if root is not None else None
    single = hydra is not None and hydra.get("mode") == RunMode.RUN and root.get("resume") == "auto"
    return single, tuple(hydra.overrides.task) if single else (), os.getcwd()


def start_stamp() -> str:
    start = time.time()
    if detect().world_size > 1:  # also mpirun and submitit tasks, whose LOCAL_RANK setup() exports only later
        import psutil

        start = psutil.Process(os.getppid()).create_time()
    return datetime.fromtimestamp(start).strftime("%Y-%m-%d_%H-%M-%S")


def resume_unfinished(root: DictConfig, stamp: str) -> str:
    """A single run with no hydra.run.dir resumes the newest unfinished default run of the same command and settings
    (mlm.rundir.unfinished_run: an exact resume, so it costs no result; a finished or failed run is never chosen), saying
    so in one line; else `stamp`, a new directory. The ranks of one launch take the choice of the first to decide
    (agreed_choice): each looking on its own could disagree when a candidate's holder ends between their looks."""
    import yaml

    from mlm.rundir import RUNS_ROOT, checkpoint_steps, unfinished_run
    from mlm.tracking import scrub

    def choose() -> str:
        overrides = scrub(list(root.hydra.overrides.task))
        settings = snapshot_tree(OmegaConf.masked_copy(root, [k for k in root if k != "hydra"]))
        found = unfinished_run(overrides, yaml.safe_load(OmegaConf.to_yaml(settings)))  # as its .hydra/config.yaml
        return stamp if found is None else found.name

    name = agreed_choice(choose)
    if name != stamp and is_main_process():
        steps = checkpoint_steps(RUNS_ROOT / name)
        print(
            f"resuming the unfinished run {RUNS_ROOT / name} (same command; its newest checkpoint is at step "
            f"{steps[0] if steps else '?'}); to start a new run instead add hydra.run.dir={RUNS_ROOT / stamp}",
            flush=True,
        )
    return name


def agreed_choice(choose) -> str:
    """choose() in a single process; under a launcher of several processes on this node (torchrun, accelerate launch),
    the value of the rank that decided first: it writes it to a file named by the launcher (its pid and start time) in
    this user's folder of the temp dir, linked into place with its whole text (so exclusive, and never through a
    link), and the others read it. (A torchrun restart of its workers reads it again: the same run dir.)"""
    if detect().world_size == 1:
        return choose()
    import psutil
    import stat
    import tempfile

    from mlm.files import open_new

    folder = Path(tempfile.gettempdir()) / f"mlm-launch-choices-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    own = os.lstat(folder)
    if not stat.S_ISDIR(own.st_mode) or own.st_uid != os.getuid():  # someone else's, or a link: decide alone
        log.warning("%s is not a folder of this user's; the ranks choose their run directory each on its own", folder)
        return choose()
    launcher = psutil.Process(os.getppid())
    path = folder / f"{launcher.pid}-{launcher.create_time():.3f}"
    if not path.is_file():
        draft = folder / f".draft-{os.getpid()}"
        with open_new(draft) as f:
            f.write(choose())
        try:
            os.link(draft, path)  # fails if another rank was first: its choice stands
        except FileExistsError:
            pass
        finally:
            draft.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW)) as f:
        return f.read()


def register() -> None:
    register_configs()
    # cached by launch_stamp (it reads the root)
    OmegaConf.register_new_resolver("mlm_launch_stamp", launch_stamp, replace=True)
    # value on the main process; on the others the second argument (default: null)
    OmegaConf.register_new_resolver(
        "mlm_main_process_only", lambda value, other=None: value if is_main_process() else other, replace=True
    )
    # python run.py --help (conf/hydra/help/mlm.yaml)
    OmegaConf.register_new_resolver("mlm_help", help_page, replace=True)
    import hydra.core.utils

    hydra.core.utils._save_config = save_config_snapshot  # Hydra 1.3's writer of .hydra/ (pinned in pyproject.toml)


def help_page(*, _root_) -> str:
    from mlm.help import help_text

    return help_text(_root_)


def save_config_snapshot(cfg: DictConfig, filename: str, output_dir: Path) -> None:
    """What Hydra writes as .hydra/config.yaml, hydra.yaml and overrides.yaml, with secrets masked (mlm.tracking.scrub:
    hydra.yaml holds the command line, `+hydra.job.env_set.HF_TOKEN=...` included) and never written through a link.
    A link there is left alone: a sweep job's directory is checked (mlm.rundir.refuse_links) only after Hydra
    writes this, and that check refuses the job in one line; a single run's was checked before."""
    output_dir = Path(output_dir)
    if output_dir.is_symlink() or (output_dir / filename).is_symlink():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / filename, OmegaConf.to_yaml(snapshot_tree(cfg)))


def snapshot_tree(cfg: DictConfig) -> dict:
    """A config as its snapshot holds it: interpolations unresolved, secrets masked (mlm.tracking.scrub)."""
    from mlm.tracking import scrub

    return scrub(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))


def mask_sweep_snapshot(sweep_dir: Path) -> None:
    """The sweep's multirun.yaml as save_config_snapshot writes a job's hydra.yaml: Hydra's sweeper writes it itself
    (the command line's secrets in clear) just before the first job starts, which masks them."""
    path = Path(sweep_dir) / "multirun.yaml"
    if path.is_symlink() or not path.is_file():
        return
    text = OmegaConf.to_yaml(snapshot_tree(OmegaConf.load(path)))
    if text != OmegaConf.to_yaml(OmegaConf.load(path)):
        atomic_write_text(path, text, shared=True)  # the parallel jobs of a sweep do this at once


def job_info(cfg_hydra) -> dict:
    from hydra.types import RunMode

    multirun = cfg_hydra.mode == RunMode.MULTIRUN
    return {
        "name": cfg_hydra.job.name,
        "overrides": list(cfg_hydra.overrides.task),
        "sweep_name": Path(cfg_hydra.sweep.dir).name if multirun else None,
        "multirun": multirun,
        "num": cfg_hydra.job.num if multirun else None,
    }


class RunDirGuard(Callback):
    """Hydra callback: lock the run (or sweep) dir before Hydra writes its .hydra snapshot and log there.

    A second run into a locked directory, or a finished run run again, stops here having touched
    nothing but the lock file. Jobs of a multirun are decided in run_job (their directories
    exist only then).
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        try:
            with exit_on_user_error(say=main_process_says):  # locked, finished with other settings, downstream failed
                results = decide_run_dir(run_dir, config)
        except Interrupted as e:  # a stop signal during the downstream fine-tune of a finished run
            main_process_says(f"stopped: {e}")
            sys.exit(e.exit_code)
        if results is not None:
            print(finished_line(run_dir, results))
            sys.exit(0)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if job_info(config.hydra)["multirun"] and is_main_process():
            mask_sweep_snapshot(Path(str(config.hydra.sweep.dir)).absolute())

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not is_main_process():
            return
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        # held by another sweep, not a directory, not writable, not ours; multirun.yaml is written only after this
        with exit_on_user_error():
            lock_run_dir(sweep_dir)
        (sweep_dir / REFUSED).unlink(missing_ok=True)  # from the last launch
        self._before = _sweep_state(sweep_dir)
        if str(config.hydra.launcher.get("_target_", "")).endswith("JoblibLauncher") and detect().world_size == 1:
            # a stop signal stops every job with a checkpoint, then the sweep
            preemption.start_parallel_sweep(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """After the summary (Hydra calls the end callbacks in reverse): keep the old multirun.yaml if
        no job ran, unlock, and exit 1 with one line if any job failed or was refused."""
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        before = getattr(self, "_before", None)  # None on the other ranks
        if before is not None and before[0] is not None and _sweep_state(sweep_dir)[1] == before[1]:
            # every job was finished already or refused: the snapshot stays that of the sweep whose results these are
            atomic_write_text(sweep_dir / "multirun.yaml", before[0])
        release_run_dir(sweep_dir)
        if before is None:
            return
        stopped, line = preemption.end_parallel_sweep(), _failures(sweep_dir)
        if line:
            print(f"error: {line}", file=sys.stderr)
        if stopped:
            print(f"stopped: {stopped_sweep_line(sweep_dir, stopped)}", file=sys.stderr)
            sys.exit(128 + stopped)
        if line:
            sys.exit(1)


def main_process_says(line: str) -> None:
    """`line` on stderr from the first process of each node; the other ranks there (which reach the same verdict) log
    it at WARNING, which their console leaves out: one copy under torchrun, and one in each node's own output."""
    if detect().local_rank == 0:
        print(line, file=sys.stderr)
    else:
        log.warning(line)


def stopped_sweep_line(sweep_dir: Path, signum: int) -> str:
    summary = sweep_dir / "summary.md"
    return (
        f"the sweep was stopped by {preemption.signal_name(signum)}: its running jobs stopped with a checkpoint and no new job started"
        + (f"; what finished is in {summary}" if summary.exists() else "")
        + f"; resume with: {resume_command(sweep_dir, sweep_dir)}"
    )


def _failures(sweep_dir: Path) -> Optional[str]:
    """One line on the sweep's failed and refused jobs and where each says why, or None: all succeeded."""
    from mlm.report import collect_jobs, failure_line

    path = sweep_dir / REFUSED
    refused = len(path.read_text().splitlines()) if path.exists() else 0
    parts = [failure_line(collect_jobs([sweep_dir])), refused and f"{refused} job(s) refused: {path}"]
    return "; ".join(p for p in parts if p) or None


REFUSED = "refused.txt"  # a job refused its directory writes nothing there; it notes itself here, in the sweep dir


def _sweep_state(sweep_dir: Path) -> tuple:
    """multirun.yaml's text (None if absent) and the mtime of every results.json and error.txt below:
    what a job that ran or failed changes."""
    snapshot = sweep_dir / "multirun.yaml"
    outcomes = {str(p): p.stat().st_mtime_ns for name in ("results.json", "error.txt") for p in sweep_dir.rglob(name)}
    return (snapshot.read_text() if snapshot.exists() else None), outcomes


def decide_run_dir(run_dir: Path, cfg: DictConfig) -> Optional[dict]:
    """Locked, finished, resumable or new? The one decision both entry points take before a job writes anything
    (RunDirGuard for a single run, run_job for a sweep's job). None: train (a new run, or a resume); the results: it
    is finished (with the downstream numbers now asked for added). RunDirLocked: the directory is not this job's
    (another run holds it, or a run with other settings); a UserError: that downstream fine-tune failed."""
    try:
        results = guard(run_dir, cfg)
    except UserError as e:
        raise RunDirLocked(str(e)) from e
    return None if results is None else with_downstream(run_dir, cfg, results)


def run_job(cfg: DictConfig, rendezvous: Rendezvous) -> Optional[float]:
    """Train one job; a user error is one line and exit code 2 (in a sweep: a failed job, the sweep goes on).
    `rendezvous`: this process's, for every job it runs."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir, job, debug = Path(hc.runtime.output_dir), job_info(hc), bool(cfg.get("debug", False))
    placed: Optional[Job] = None  # once the job is set up: its failure time orders error.txt
    try:
        if preemption.in_sweep() and preemption.stop_requested():  # a queued job of a stopped sweep: not started
            log.warning("not started: the sweep was stopped by %s", preemption.signal_name(preemption.stop_requested()))
            return None
        results = decide_run_dir(run_dir, cfg)
        if results is not None:  # a multirun job (single runs stop in RunDirGuard, before Hydra writes)
            print(finished_line(run_dir, results))
            return objective(results)
        typed: Config = OmegaConf.to_object(cfg)
        typed.validate()  # a bad setting is refused before the training code (seconds of imports) is loaded
        placed = Job(run_dir, rendezvous, typed.runtime.device_slots, typed.runtime.collective_timeout_minutes)
        # results.json records the settings as asked: train() resolves some in `typed` (runtime.mixed_precision=auto)
        results = train_in_job(typed, OmegaConf.to_container(cfg, resolve=True), run_dir, job, placed)
    except Interrupted as e:  # preempted or stopped by hand: a checkpoint is written
        return stopped(e)
    except RunDirLocked as e:  # not this job's directory: write nothing into it
        if job["multirun"] and is_main_process():
            with open_append(Path(hc.sweep.dir) / REFUSED) as f:  # one short line per job: appends do not interleave
                f.write(f"{run_dir}: {str(e).splitlines()[0]}\n")
        return _fail(run_dir, job, str(e), record=False)
    except UserError as e:
        if debug:
            raise
        return _fail(run_dir, job, str(e), resumable=isinstance(e, Resumable), placed=placed)
    except Exception as e:
        if job["multirun"] and not debug:  # one broken job must not end the sweep; its log has the traceback
            log.exception("job failed")
            return _fail(run_dir, job, f"{type(e).__name__}: {e}", resumable=isinstance(e, PeerFailed), placed=placed)
        raise
    else:
        report_run(typed, run_dir, results)
        return objective(results)
    finally:  # _fail's sys.exit passes here too
        release_run_dir(run_dir)


def train_in_job(cfg: Config, asked: dict, run_dir: Path, job: dict, placed: Job) -> dict:
    """train() on this job's device and process group (`placed`): a failure on any rank fails it on all."""
    from mlm.train import NonFiniteLoss, train

    try:
        with placed:
            placed.check_shared_run_dir()
            return train(cfg, run_dir, {**job, "device_slot": placed.slot}, asked, placed)
    except NonFiniteLoss as e:
        raise UserError(str(e)) from e


def stopped(e: Interrupted) -> None:
    """A job stopped by a signal, its checkpoint written: one line; a parallel sweep's job returns (the sweep ends
    after its summary, RunDirGuard.on_multirun_end), any other process exits with the signal's code."""
    log.warning(str(e))  # on the console of the main process only (mlm.progress.MainProcessConsole)
    if detect().local_rank == 0:  # one copy in each node's output
        print(f"stopped: {e}", file=sys.stderr)
    if not preemption.in_sweep():
        sys.exit(e.exit_code)


def report_run(cfg: Config, run_dir: Path, results: dict) -> None:
    """The main process's curves.png and summary of a trained run."""
    if not is_main_process():
        return
    from mlm.report import plot_run

    try:
        plot_run(run_dir)
    except OSError as e:  # the results are written; a missing plot must not fail the run
        log.warning("could not write %s: %s", run_dir / "curves.png", e)
    print(summary_text(cfg, run_dir, results))


def with_downstream(run_dir: Path, cfg: DictConfig, results: dict) -> dict:
    """A finished run asked for downstream numbers its results.json lacks gets them now (the main process
    fine-tunes its final/; see mlm.downstream.add_to_finished_run); its results, updated or not."""
    if cfg.downstream.kind == "none" or not is_main_process():
        return results
    from mlm.downstream import add_to_finished_run, summary_line
    from mlm.rundir import flat_settings

    updated = add_to_finished_run(
        run_dir, OmegaConf.to_object(cfg.downstream), flat_settings(cfg), results, cfg.model.trust_remote_code
    )
    if updated is not results:
        print(f"{summary_line(updated['downstream'])}: added to {run_dir / 'results.json'}")
    return updated


def objective(results: dict) -> Optional[float]:
    """What a job returns to the sweeper (Optuna minimises it): its final eval's bits per character, or no value where
    that or the perplexity is NaN, inf or missing, which the summary calls failed (a NaN would make the Optuna sweeper
    raise, see _fail). Per character, not per token, so that a study may search tokenizer settings: trials of one
    tokenizer and seed score the same masked tokens, so bits per character orders them exactly as perplexity does."""
    from mlm.report import bits_per_char, failure

    job = {"error": None, "results": results}
    return None if failure(job) else bits_per_char(job)


def _fail(
    run_dir: Path, job: dict, message: str, record: bool = True, resumable: bool = False, placed: Optional[Job] = None
) -> Optional[float]:
    """error.txt and one line; the command that resumes the run only for a failure a rerun gets past (`resumable`: a
    failed write, a failed peer): a bad setting or a NaN loss fails again. `placed`: the Job, once it has started."""
    from mlm.job import failure_report

    log.error(message)
    if record and is_main_process() and run_dir.is_dir():
        try:
            report = failure_report(run_dir, message, placed and placed.failure_time)
            atomic_write_text(run_dir / "error.txt", report + "\n" + (resume_note(run_dir) if resumable else ""))
        except OSError as e:  # the disk that failed the run may fail this too; the message below still says why
            log.warning("could not write %s: %s", run_dir / "error.txt", e)
    if job["multirun"]:
        # No value: Optuna records the trial as FAIL and goes on (NaN makes it raise: it refuses to tell
        # COMPLETE with NaN, then FAIL with a value); the basic sweeper and launchers go on with any value.
        return None
    # one copy in each node's output; the other ranks' log.error above is tagged with the rank
    sys.exit(error_code(message, say=stderr if detect().local_rank == 0 else None))


def before_text(results: dict, key: str = "perplexity_before", digits: int = 2) -> str:
    """The eval score of results.json `key` (perplexity_before, bits_per_char_before) before training, with `digits`
    decimals, or why there is none: a resume onto other data keeps none (train.forget_other_data)."""
    if results.get(key) is not None:
        return f"{results[key]:.{digits}f} before"
    if (results.get("branched_from") or {}).get("other_data"):
        return "none before on this data (started from a checkpoint trained on other data)"
    return "none before (not measured)"


def summary_text(cfg: Config, run_dir: Path, results: dict) -> str:
    lines = [
        "",
        f"perplexity: {before_text(results)} -> {results['perplexity']:.2f} after "
        f"({results['steps']} steps, {results['train_seconds']:.0f} s, {results['tokens_per_s']:.0f} tokens/s"
        + (f", {results['data_wait']:.0%} of it waiting for data)" if results.get("data_wait") is not None else ")"),
        f"run directory: {run_dir}",
    ]
    if results.get("ema_perplexity") is not None:
        lines.insert(
            2,
            f"weight average (trainer.ema_decay={cfg.trainer.ema_decay:g}): perplexity {results['ema_perplexity']:.2f}; "
            f"model: {run_dir / 'final_ema'}",
        )
    if results.get("mfu") is not None:
        lines.insert(
            2,
            f"model FLOPs utilisation: {results['mfu']:.1%} of the device's peak ({results['train_flops'] / 1e12:.1f} TFLOP trained)",
        )
    if "downstream" in results:
        from mlm.downstream import summary_line

        lines.insert(2, summary_line(results["downstream"]))
    if results.get("bits_per_char") is not None:  # under the perplexity: the measure that compares tokenizers
        before = before_text(results, "bits_per_char_before", 3)
        lines.insert(2, f"bits per character: {before} -> {results['bits_per_char']:.3f} after")
    final = run_dir / "final"
    if final.exists():
        lines.append(f'model: {final}  (python -m mlm.predict {final} "... <mask> ...")')
    if final.exists() and cfg.trainer.probe_sentences:  # final/ is loaded only to fill in probe sentences
        from mlm.config import ModelConfig
        from mlm.models import build_pretrained, load_tokenizer
        from mlm.predict import format_predictions, fill_mask

        # this run's own model: its code was trusted on this command line, or it has none
        model_cfg = ModelConfig(name_or_path=str(final), trust_remote_code=cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(model_cfg)
        model = build_pretrained(model_cfg, tokenizer)
        for text in cfg.trainer.probe_sentences:
            lines.append(format_predictions(text, fill_mask(model, tokenizer, text, cfg.trainer.top_k)))
    return "\n".join(lines)
