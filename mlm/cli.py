"""What run.py does around training: resolvers, the typed config, errors as one line, the summary."""

from __future__ import annotations

import difflib
import logging
import os
import sys
import time
import typing
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mlm import preemption
from mlm.config import CONF, GROUPS, Config, Resumable, UserError, choices_of, register_configs, schema_fields
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
    try:
        name = launch_name()
    except UserError as e:  # in a resolver: Hydra would wrap it in its own error (exit code 1)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
        tree = OmegaConf.to_container(
            OmegaConf.masked_copy(root, [k for k in root if k != "hydra"]), resolve=False, enum_to_str=True
        )
        found = unfinished_run(
            overrides, yaml.safe_load(OmegaConf.to_yaml(scrub(tree)))
        )  # as save_config_snapshot writes it
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
    OmegaConf.register_new_resolver(
        "mlm_launch_stamp", launch_stamp, replace=True
    )  # cached by launch_stamp (it reads the root)
    # value on the main process; on the others the second argument (default: null)
    OmegaConf.register_new_resolver(
        "mlm_main_process_only", lambda value, other=None: value if is_main_process() else other, replace=True
    )
    OmegaConf.register_new_resolver(
        "mlm_help", help_page, replace=True
    )  # python run.py --help (conf/hydra/help/mlm.yaml)
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
    from mlm.tracking import scrub

    output_dir = Path(output_dir)
    if output_dir.is_symlink() or (output_dir / filename).is_symlink():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    tree = scrub(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
    atomic_write_text(output_dir / filename, OmegaConf.to_yaml(tree))


def mask_sweep_snapshot(sweep_dir: Path) -> None:
    """The sweep's multirun.yaml as save_config_snapshot writes a job's hydra.yaml: Hydra's sweeper writes it itself
    (the command line's secrets in clear) just before the first job starts, which masks them."""
    from mlm.tracking import scrub

    path = Path(sweep_dir) / "multirun.yaml"
    if path.is_symlink() or not path.is_file():
        return
    text = OmegaConf.to_yaml(scrub(OmegaConf.to_container(OmegaConf.load(path), resolve=False)))
    if text != OmegaConf.to_yaml(OmegaConf.load(path)):
        atomic_write_text(path, text, shared=True)  # the parallel jobs of a sweep do this at once


def schema_keys() -> Dict[str, Any]:
    """Every key of the typed config as a dotted path -> its type (Dict fields take free-form keys below them)."""
    return {key: kind for key, (_, kind) in schema_fields().items()}


def check_override_keys(args: List[str]) -> None:
    """Command-line overrides name real keys and allowed values: a misspelled key (with the closest real one), or a value
    outside a choice (sweep lists included), gets one line (UserError) before Hydra composes anything (Hydra's
    advice for an unknown key, `+key=value`, is wrong for a typed config, and its choice error ends a sweep midway)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys, parser = schema_keys(), OverridesParser.create()
    for arg in args:
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception:  # a flag, or a line Hydra will explain itself
            continue
        key = override.key_or_group
        if key in GROUPS or "/" in key or key.split(".")[0] == "hydra" or override.is_delete():
            continue
        if key not in keys:
            if not any(
                typing.get_origin(kind) in (dict, Dict) and key.startswith(path + ".") for path, kind in keys.items()
            ):
                raise UserError(unknown_key_line(key, keys))
            continue  # model.arch.<any config field>
        allowed = choices_of(keys[key])
        if allowed is not None:
            bad = [v for v in override_values(override) if v not in allowed]
            if bad:
                raise UserError(f"{key}={bad[0]} is not one of {', '.join(allowed)}")


def override_values(override) -> List[str]:
    """The string values an override gives its key: each of a choice sweep's, each of a list's, or the one."""
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # an interval sweep: not a choice field's
            return []
    value = override.value()
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def unknown_key_line(key: str, keys: Dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(keys) + list(GROUPS), n=1, cutoff=0.6)
    return f"unknown config key {key!r}" + (
        f"; did you mean {close[0]}?" if close else "; python run.py --help lists the keys"
    )


def compose(overrides=()) -> Config:
    """The config `python run.py <overrides>` runs with (conf/ of this checkout, composed by Hydra), as the typed Config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=list(overrides)))


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
    nothing but the lock file. Jobs of a multirun are guarded again in run_job (their directories
    exist only then).
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        try:
            results = guard(run_dir, config)
            if results is not None:
                results = with_downstream(run_dir, config, results)
        except UserError as e:  # locked, or finished with other settings (or its downstream task failed)
            main_process_says(f"error: {e}")
            sys.exit(2)
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
        try:
            lock_run_dir(sweep_dir)
        except UserError as e:  # held by another sweep, not a directory, not writable, not ours; multirun.yaml is written only after this
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        (sweep_dir / REFUSED).unlink(missing_ok=True)  # from the last launch
        self._before = _sweep_state(sweep_dir)
        if str(config.hydra.launcher.get("_target_", "")).endswith("JoblibLauncher") and detect().world_size == 1:
            preemption.start_parallel_sweep(
                sweep_dir
            )  # a stop signal stops every job with a checkpoint, then the sweep

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

    refused = (sweep_dir / REFUSED).read_text().splitlines() if (sweep_dir / REFUSED).exists() else []
    parts = [failure_line(collect_jobs([sweep_dir]))] + (
        [f"{len(refused)} job(s) refused: {sweep_dir / REFUSED}"] if refused else []
    )
    return "; ".join(p for p in parts if p) or None


# A sweep job refused its directory (locked, or finished with other settings) writes nothing
# there; it notes itself here, in the sweep directory, which its sweep holds.
REFUSED = "refused.txt"


def _sweep_state(sweep_dir: Path) -> tuple:
    """multirun.yaml's text (None if absent) and the mtime of every results.json and error.txt below:
    what a job that ran or failed changes."""
    snapshot = sweep_dir / "multirun.yaml"
    outcomes = {str(p): p.stat().st_mtime_ns for name in ("results.json", "error.txt") for p in sweep_dir.rglob(name)}
    return (snapshot.read_text() if snapshot.exists() else None), outcomes


def run_job(cfg: DictConfig, rendezvous: Rendezvous) -> Optional[float]:
    """Train one job; a user error is one line and exit code 2 (in a sweep: a failed job, the sweep goes on).
    `rendezvous`: this process's, for every job it runs."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    job = job_info(hc)
    debug = bool(cfg.get("debug", False))
    placed: Optional[Job] = None  # once the job has started: its failure time orders error.txt
    try:
        if preemption.in_sweep() and preemption.stop_requested():  # a queued job of a stopped sweep: not started
            log.warning("not started: the sweep was stopped by %s", preemption.signal_name(preemption.stop_requested()))
            return None
        try:
            done = guard(run_dir, cfg)
        except UserError as e:  # locked, or finished with other settings: not ours to write into
            raise RunDirLocked(str(e)) from e
        if done is not None:  # a multirun job (single runs stop in RunDirGuard, before Hydra writes)
            done = with_downstream(run_dir, cfg, done)
            print(finished_line(run_dir, done))
            return objective(done)
        typed: Config = OmegaConf.to_object(cfg)
        typed.validate()  # a bad setting is refused before the training code (seconds of imports) is loaded
        from mlm.train import NonFiniteLoss, train

        try:
            # one device and one process group for this job; a failure on any rank fails it on all
            runtime = typed.runtime
            with Job(run_dir, rendezvous, runtime.device_slots, runtime.collective_timeout_minutes) as placed:
                placed.check_shared_run_dir()
                tree = OmegaConf.to_container(cfg, resolve=True)
                results = train(typed, run_dir, {**job, "device_slot": placed.slot}, tree, placed)
        except NonFiniteLoss as e:
            raise UserError(str(e)) from e
    except (
        Interrupted
    ) as e:  # preempted or stopped by hand: a checkpoint is written; a sequential sweep stops with its job
        log.warning(str(e))  # on the console of the main process only (mlm.progress.MainProcessConsole)
        if detect().local_rank == 0:  # one copy in each node's output
            print(f"stopped: {e}", file=sys.stderr)
        if (
            preemption.in_sweep()
        ):  # a parallel sweep's job: the sweep ends after its summary (RunDirGuard.on_multirun_end)
            return None
        sys.exit(e.exit_code)
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
        if is_main_process():
            from mlm.report import plot_run

            try:
                plot_run(run_dir)
            except OSError as e:  # the results are written; a missing plot must not fail the run
                log.warning("could not write %s: %s", run_dir / "curves.png", e)
            print(summary_text(typed, run_dir, results))
        return objective(results)
    finally:  # _fail's sys.exit passes here too
        release_run_dir(run_dir)


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
    """What a job returns to the sweeper: its final perplexity, or no value where that is NaN, inf or
    missing, which the summary calls failed (a NaN would make the Optuna sweeper raise, see _fail)."""
    from mlm.report import failure

    return None if failure({"error": None, "results": results}) else results["perplexity"]


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
    if (
        detect().local_rank == 0
    ):  # one copy in each node's output; the other ranks' log.error above is tagged with the rank
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def before_text(results: dict) -> str:
    """The perplexity before training, or why there is none: a resume onto other data keeps none (train.forget_other_data)."""
    if results.get("perplexity_before") is not None:
        return f"{results['perplexity_before']:.2f} before"
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
