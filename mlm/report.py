"""Run curves and sweep summaries.

- `plot_run(run_dir)`: curves.png beside metrics.jsonl (train loss raw and smoothed, eval perplexity and the weight
  average's, lr), titled with the run's settings.
- `python -m mlm.report <sweep or run dirs...> [--out DIR]`: summary.md (the overrides every job shares once on top,
  then one numbered row per job: a column per swept key, sorted by perplexity; EMA and downstream columns where jobs
  have them; failed and unfinished jobs last, with what became of them; a sweep column for several sweeps) and
  summary.png (perplexity against each swept key, a panel per key, and the curves). A sweep over
  trainer.budget_minutes or trainer.max_steps also gets budget.png (perplexity and downstream accuracy against
  training tokens and time, the Pareto front marked) and a table of each front in summary.md: what each minute buys.
  Hydra calls the same at the end of every multirun (SweepSummaryCallback in conf/config.yaml).
- Only like with like is ranked: jobs whose evals differ (EVAL_KEYS: held-out text, blocks, tokenizer,
  eval masks) are ranked in separate groups, never across, and the summary names the keys that differ.
  Jobs that differ only in their tokenizer (its recorded fingerprint, results.json data.tokenizer, else the
  settings that name it) are one group ranked by bits per character of the masked tokens (mlm/characters.py),
  and the summary says so: a perplexity is per token, so it is never compared across tokenizers.
  At the start of a multirun the same callback refuses an Optuna search space that varies an eval key
  other than the tokenizer (Optuna minimises bits per character: mlm.cli.objective).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mlm.config import UserError
from mlm.files import atomic_path, atomic_write_text
from mlm.records import content_hashes, malformed_data
from mlm.tracking import read_metrics


def pyplot():
    """matplotlib, imported only where a plot is drawn: Hydra loads this module for every run (the
    sweep callback), and a first import on a fresh machine prints a font-cache notice and takes seconds."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    pyplot().close(fig)


def _series(records: List[Dict[str, Any]], key: str):
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(
    run_dir: Path, keys: Optional[List[str]] = None, records: Optional[List[Dict[str, Any]]] = None
) -> Optional[Path]:
    """curves.png: train loss (raw, faint, and smoothed), eval perplexity (and the weight average's, where the run keeps
    one) on a log scale, and the learning rate, against the optimizer step; titled with the run's settings: its swept
    `keys` where a sweep summary gives them, else every override it was started with. `records`: its metrics.jsonl,
    where the caller has read it already."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir) if records is None else records
    if not records:
        return None
    plt = pyplot()
    fig, (loss, ppl, lr) = plt.subplots(1, 3, figsize=(14, 4.4), layout="constrained")
    x, y = _series(records, "train/loss")
    # one point: a marker
    loss.plot(x, y, color="C0", alpha=0.3, lw=1, marker="o" if len(x) == 1 else None, label="logged")
    weight = smoothing_weight(len(y))
    loss.plot(x, smoothed(y, weight), color="C0", lw=2, label=f"smoothed (EMA {weight:.2g})")
    loss.set_title("train loss (masked tokens)", fontsize=10)
    for key, label, colour in (
        ("eval/perplexity", "model", "C1"),
        ("eval/ema_perplexity", "weight average (trainer.ema_decay)", "C2"),
    ):
        x, y = _series(records, key)
        if y:  # the last value in the legend, not over a curve
            ppl.plot(x, y, marker="o", markersize=4, color=colour, label=f"{label}: {y[-1]:.1f} at step {x[-1]}")
    values = [v for key in ("eval/perplexity", "eval/ema_perplexity") for v in _series(records, key)[1]]
    if values:
        plain_scale(ppl, "y", values)
    ppl.set_title("eval perplexity", fontsize=10)
    x, y = _series(records, "train/lr")
    lr.plot(x, y, color="C4", marker="o" if len(x) == 1 else None)
    if y:
        plain_scale(lr, "y", [max(y)] * 2)  # linear, plain labels
    lr.set_title("learning rate", fontsize=10)
    for ax in (loss, ppl, lr):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in (loss, ppl):  # below the panel: never over a curve
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.suptitle(run_title(run_dir, keys), fontsize=11)
    path = run_dir / "curves.png"
    save_png(fig, path)
    return path


def run_title(run_dir: Path, keys: Optional[List[str]] = None) -> str:
    """'<dir>: optimizer.lr=0.001, scheduler=wsd': the run's swept `keys` (or all its overrides), wrapped to two lines at most."""
    overrides = _override_dict(run_dir)
    shown = {k: v for k, v in overrides.items() if keys is None or k in keys}
    settings = ", ".join(f"{k}={_short(v)}" for k, v in shown.items())
    name = "/".join(run_dir.parts[-2:]) if keys is not None else run_dir.name  # a sweep's job: its sweep's name too
    lines = textwrap.wrap(f"{name}: {settings}", 150) if settings else [name]
    return "\n".join(lines[:2]) + (" ..." if len(lines) > 2 else "")


def _override_dict(job_dir: Path) -> Dict[str, str]:
    """The job's overrides (.hydra/overrides.yaml) as key: value, the hydra.* ones left out."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    import yaml

    try:  # Hydra writes this file in place: a job killed in that instant leaves it torn (its rerun rewrites it)
        overrides = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    return dict(o.split("=", 1) for o in overrides if isinstance(o, str) and not o.startswith("hydra") and "=" in o)


def _trained_with(overrides: Dict[str, str], trained: Dict[str, Any]) -> Dict[str, str]:
    """The overrides, with the values the results were trained with where those differ.

    Hydra rewrites .hydra/overrides.yaml at every launch, also for a job that then refuses to
    run (a sweep rerun into the same directory with other values); results.json keeps the truth.
    """

    def same(a, b):
        na, nb = _num(a), _num(b)
        return na == nb if na is not None and nb is not None else str(a).lower() == str(b).lower()

    return {k: v if k not in trained or same(v, trained[k]) else str(trained[k]) for k, v in overrides.items()}


def _job_dirs(root: Path):
    """`root` and every directory below it."""
    yield Path(root)
    yield from sorted(p for p in Path(root).rglob("*") if p.is_dir())


def collect_jobs(dirs: List[Path]) -> List[Dict[str, Any]]:
    """Every job directory (one with results.json or error.txt) under the given directories; "root": which of them."""
    return collect(dirs)[0]


def collect(dirs: List[Path]) -> tuple:
    """The jobs under the given directories, in one walk: those with an outcome (results.json or error.txt), and the
    Hydra jobs (a .hydra/overrides.yaml) with neither: running, stopped or killed; "unfinished" says which, and how far
    each got. Unfinished jobs are never ranked nor counted as failed. "root": which directory each was found under."""
    jobs, unfinished = [], []
    for root in dirs:
        for d in _job_dirs(root):
            finished = (d / "results.json").exists() or (d / "error.txt").exists()
            if not finished and not (d / ".hydra" / "overrides.yaml").is_file():
                continue
            # results.json is written atomically
            results = json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else {}
            job = {
                "dir": d,
                "root": Path(root),
                "overrides": _trained_with(_override_dict(d), results.get("config", {})),
                "results": results,
                "settings": results.get("config") or _snapshot_settings(d),  # the eval it was scored on
                "error": (d / "error.txt").read_text().strip() if (d / "error.txt").exists() else None,
                "metrics": read_metrics(d),
            }
            if not finished:
                job["unfinished"] = unfinished_status(d, job["metrics"])
            (jobs if finished else unfinished).append(job)
    return jobs, unfinished


def unfinished_status(job_dir: Path, metrics: List[Dict[str, Any]]) -> str:
    """What became of a job that wrote no outcome, from its run.lock (mlm/rundir.py): a clean end (a stop signal,
    which leaves a checkpoint) empties the holder's record; a killed process leaves it; a live one still holds it."""
    from mlm.rundir import describe, lock_state

    state, holder = lock_state(job_dir)
    said = {
        "none": "not started (no run.lock)",
        "ended": "stopped",
        "unreadable": "unfinished (its run.lock is unreadable)",
        "killed": "killed (its process ended without a word)",
    }.get(state) or f"running ({describe(holder)})"
    return said if state == "none" else f"{said}: {_progress(job_dir, metrics)}"


def _progress(job_dir: Path, metrics: List[Dict[str, Any]]) -> str:
    """'step 57 logged, checkpoint at step 50': how far an unfinished job got."""
    from mlm.rundir import checkpoint_steps

    logged = max((r["step"] for r in metrics if isinstance(r.get("step"), int)), default=None)
    saved = checkpoint_steps(job_dir)
    return (f"step {logged} logged" if logged is not None else "no step logged") + (
        f", checkpoint at step {saved[0]}" if saved else ", no checkpoint"
    )


def failure(job: Dict[str, Any]) -> Optional[str]:
    """Why a job counts as failed (the first line of its error.txt, or a perplexity that is missing,
    NaN or inf in its results.json), or None: it succeeded. The summary and the sweep's exit status
    both ask here."""
    if job["error"] is not None:
        return (job["error"].splitlines() or ["failed"])[0]
    ppl = job["results"].get("perplexity")
    if not isinstance(ppl, (int, float)):
        return "no perplexity in results.json"
    if not math.isfinite(ppl):
        return f"perplexity {ppl} in results.json"
    return None


def failure_line(jobs: List[Dict[str, Any]]) -> Optional[str]:
    """One line naming the failed jobs and the file that says why (error.txt, else results.json), or None."""
    failed = [j for j in jobs if failure(j) is not None]
    if not failed:
        return None
    files = [str(j["dir"] / ("error.txt" if j["error"] is not None else "results.json")) for j in failed]
    return f"{len(failed)} of {len(jobs)} job(s) failed: {' '.join(files)}"


# ---------------------------------------------------------------- which evals compare

# What an eval perplexity is measured on, as flat config keys: the held-out text (source, split,
# size, seed), the blocks (length, how many are scored), the vocabulary, and the eval masks (rate,
# strategy, 80/10/10). Jobs that differ in any of these are scored on different tasks, so the
# summary never ranks them together, and a search space must not vary them (check_search_space
# refuses an Optuna one; tests/test_sweeps.py holds the shipped spaces to it). Not here: what only
# training uses (masking.strategy and train_probability: evals mask with eval_strategy at
# mlm_probability), the seed (it draws the fixed eval masks as it draws the init: noise of one task,
# which sweeping seeds measures), and what changes only speed (num_proc, eval_batch_size).
EVAL_KEYS = (
    "dataset.kind",
    "dataset.path",
    "dataset.config_name",
    "dataset.split",
    "dataset.text_field",
    "dataset.test_size",
    "dataset.split_seed",
    "dataset.include_news",
    "dataset.max_examples",
    "dataset.remainder",
    "dataset.streaming",
    "dataset.streaming_eval_docs",
    "block_size",
    "trainer.max_eval_blocks",
    "model.tokenizer",  # unset: model.name_or_path's; and every tokenizer.* key (eval_keys)
    "masking.mlm_probability",
    "masking.eval_strategy",
    "masking.mask_replace_prob",
    "masking.random_replace_prob",
)
# shape the eval masks only with eval_strategy=span
SPAN_EVAL_KEYS = ("masking.span_geometric_p", "masking.span_max_words")
# What a downstream accuracy is measured on (the fine-tuning lr, epochs, batch and seeds are training's).
DOWNSTREAM_EVAL_KEYS = (
    "downstream.kind",
    "downstream.task",
    "downstream.path",
    "downstream.config_name",
    "downstream.text_fields",
    "downstream.label_field",
    "downstream.eval_split",
    "downstream.folds",
    "downstream.max_length",
)
UNKNOWN = "(not recorded)"  # a key a job's saved config lacks: not assumed equal to anything


def eval_keys(flat: Dict[str, Any]) -> List[str]:
    """The flat keys whose values set the eval of a config: EVAL_KEYS, the span shape where evals mask spans,
    model.name_or_path where it gives the tokenizer (model.tokenizer unset), and the tokenizer.* settings of a
    trained tokenizer. eval_settings reads these."""
    keys = list(EVAL_KEYS)
    if flat.get("masking.eval_strategy") == "span":
        keys += SPAN_EVAL_KEYS
    if flat.get("model.tokenizer") is None:
        keys.append("model.name_or_path")
    return keys + sorted(k for k in flat if k.startswith("tokenizer."))


def is_tokenizer_setting(key: str) -> bool:
    """Whether an eval setting (eval_keys, eval_settings) says only which tokenizer cut the text: jobs that differ in
    these alone are compared by bits per character. model.name_or_path is an eval key only where it names the tokenizer."""
    return key in ("model.tokenizer", "model.name_or_path", "data.tokenizer") or key.startswith("tokenizer.")


def eval_settings(flat: Dict[str, Any], data: Any = None) -> Dict[str, Any]:
    """What a job's perplexity was measured on: its eval_keys, the tokenizer as model.tokenizer whichever key gave it.
    With the data identity the job recorded (results.json "data", mlm/data/identity.py), the data is what it read, not
    what it was called: the source files' content hashes (data.sources) stand for dataset.path, and the tokenizer's
    hash (data.tokenizer) for its name. Two jobs are comparable where these are equal."""
    values = {k: flat.get(k, UNKNOWN) for k in eval_keys(flat)}
    if "model.name_or_path" in values:
        values["model.tokenizer"] = values.pop("model.name_or_path")
    hashes = content_hashes(data)
    if hashes is not None:  # `./corpus.txt` and `corpus.txt` are one corpus; `corpus.txt` edited is another
        del values["dataset.path"]
        values["data.sources"] = hashes
    if malformed_data(data) is None and isinstance(data, dict) and data.get("tokenizer"):  # its fingerprint, alone
        values = {k: v for k, v in values.items() if not is_tokenizer_setting(k)}
        values["data.tokenizer"] = data["tokenizer"]
    return values


def job_eval_settings(job: Dict[str, Any]) -> Dict[str, Any]:
    return eval_settings(job_settings(job), job["results"].get("data"))


def job_text_settings(job: Dict[str, Any]) -> Dict[str, Any]:
    """The job's eval settings but its tokenizer: the text and masks it was scored on."""
    return {k: v for k, v in job_eval_settings(job).items() if not is_tokenizer_setting(k)}


def job_tokenizer(job: Dict[str, Any]) -> tuple:
    """Which tokenizer cut the job's text: its fingerprint where recorded, else the settings that name it."""
    return _frozen({k: v for k, v in job_eval_settings(job).items() if is_tokenizer_setting(k)})


def bits_per_char(job: Dict[str, Any]) -> Optional[float]:
    """The job's final eval bits per character (mlm/characters.py), or None (a run of an older version)."""
    value = job["results"].get("bits_per_char")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def by_characters(group: List[Dict[str, Any]]) -> bool:
    """Whether a group of comparable jobs is ranked by bits per character: its tokenizers differ."""
    return len({job_tokenizer(j) for j in group}) > 1


def job_downstream_settings(job: Dict[str, Any]) -> Dict[str, Any]:
    flat = job_settings(job)
    return {k: flat.get(k, UNKNOWN) for k in DOWNSTREAM_EVAL_KEYS}


def job_settings(job: Dict[str, Any]) -> Dict[str, Any]:
    """A job's flat config: what results.json says it trained with, else its own .hydra/config.yaml."""
    return job.get("settings") or job["results"].get("config") or {}


def _snapshot_settings(job_dir: Path) -> Dict[str, Any]:
    """.hydra/config.yaml as flat keys, read as data: interpolations stay text (compared, never resolved)."""
    path = job_dir / ".hydra" / "config.yaml"
    if path.is_symlink() or not path.is_file():
        return {}
    import yaml

    from mlm.tracking import flatten

    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return flatten({k: v for k, v in tree.items() if k != "hydra"}) if isinstance(tree, dict) else {}


def _frozen(values: Dict[str, Any]) -> tuple:
    return tuple((k, json.dumps(v, sort_keys=True, default=str)) for k, v in sorted(values.items()))


def comparable_groups(jobs: List[Dict[str, Any]], settings_of=job_eval_settings) -> List[List[Dict[str, Any]]]:
    """The jobs in groups of equal eval settings (`settings_of` a job), the largest first (ties: in the jobs' order)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for j in jobs:
        groups.setdefault(_frozen(settings_of(j)), []).append(j)
    return sorted(groups.values(), key=len, reverse=True)


MIXED = "(several: ranked by bits per character)"  # a group's tokenizer where its jobs' differ


def group_settings(group: List[Dict[str, Any]], settings_of=job_eval_settings) -> Dict[str, Any]:
    """The settings of a group's jobs; MIXED for a key whose values differ within it (a group ranked by bits per character)."""
    values = [settings_of(j) for j in group]
    keys = dict.fromkeys(k for v in values for k in v)
    return {
        k: values[0].get(k, UNKNOWN)
        if len({json.dumps(v.get(k, UNKNOWN), default=str) for v in values}) == 1
        else MIXED
        for k in keys
    }


def differing_keys(groups: List[List[Dict[str, Any]]], settings_of=job_eval_settings) -> List[str]:
    """The eval keys whose values differ between the groups (a key one group lacks counts as differing)."""
    values = [group_settings(g, settings_of) for g in groups]
    keys = sorted({k for v in values for k in v})
    return [k for k in keys if len({json.dumps(v.get(k, UNKNOWN), default=str) for v in values}) > 1]


def group_label(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"G{i + 1}"


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fmt(v, digits=2):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def ranked(jobs: List[Dict[str, Any]]) -> tuple:
    """The succeeded jobs in groups of comparable evals (the largest first), and the failed jobs. Jobs scored on the same
    text and masks are one group: sorted by perplexity where they share a tokenizer, else by bits per character
    (by_characters), where every one has it; a job without it (an older version's) is grouped by its tokenizer too."""
    ok = [j for j in jobs if failure(j) is None]
    groups = []
    for same_text in comparable_groups(ok, job_text_settings):
        if by_characters(same_text) and all(bits_per_char(j) is not None for j in same_text):
            groups.append(sorted(same_text, key=bits_per_char))
        else:
            groups += [sorted(g, key=lambda j: j["results"]["perplexity"]) for g in comparable_groups(same_text)]
    return sorted(groups, key=len, reverse=True), [j for j in jobs if failure(j) is not None]


def score(groups: List[List[Dict[str, Any]]]) -> tuple:
    """(results key, metrics key, words) of what summary.png and the Pareto fronts plot on their one y axis: bits per
    character where a group is ranked by it and every job has it (within a group of one tokenizer it orders the jobs
    as perplexity does), else perplexity, so that no job (an older version's, without it) drops out of the plot."""
    jobs = [j for g in groups for j in g]
    if any(by_characters(g) for g in groups) and all(bits_per_char(j) is not None for j in jobs):
        return "bits_per_char", "eval/bits_per_char", "bits per character"
    return "perplexity", "eval/perplexity", "perplexity"


def score_text(job: Dict[str, Any], groups: List[List[Dict[str, Any]]]) -> str:
    """The number a job is ranked by in its group, in words."""
    if any(by_characters(g) and any(j is job for j in g) for g in groups):
        return (
            f"{bits_per_char(job):.3f} bits per character (perplexity {job['results']['perplexity']:.2f}, not compared)"
        )
    return f"perplexity {job['results']['perplexity']:.2f}"


def in_rows(ranking: tuple, unfinished: List[Dict[str, Any]] = ()) -> List[Dict[str, Any]]:
    """The jobs in the order of summary.md's rows (its `#`, which summary.png's legend uses too): each eval group's
    jobs by perplexity (`ranking`: what ranked() returns), then the failed jobs, then the unfinished ones."""
    groups, failed = ranking
    return [j for g in groups for j in g] + failed + list(unfinished)


STATUS_WIDTH = 60  # a longer failure reason is cut at a word in its cell and given whole in a note below the table


def summary_table(ranking: tuple, unfinished: List[Dict[str, Any]] = ()) -> str:
    """One row per job, numbered (`#`): each eval group's jobs by perplexity (an `eval` column names the group where
    there are several), then the failed jobs, then the unfinished ones. A `sweep` column where the jobs come from
    several directories, a column per swept key, an EMA and a downstream column where some job has one; a long
    failure reason in full in a numbered note below. `ranking`: what ranked() returns."""
    groups = ranking[0]
    rows = in_rows(ranking, unfinished)
    keys = swept_keys(rows)
    labels = {id(j): group_label(i) for i, g in enumerate(groups) for j in g} if len(groups) > 1 else None
    several = any(j.get("sweep") for j in rows)
    ema = any(_num(j["results"].get("ema_perplexity")) is not None for j in rows)  # an unfinished job has no results
    chars = any(bits_per_char(j) is not None for j in rows)
    downstream = any(downstream_accuracy(j) is not None for j in rows)
    columns = (
        ["#"]
        + (["sweep"] if several else [])
        + ["job"]
        + keys
        + (["eval"] if labels else [])
        + ["final ppl"]
        + (["bits/char"] if chars else [])
        + (["EMA ppl"] if ema else [])
        + ["best ppl", "ppl before"]
        + (["downstream"] if downstream else [])
        + ["tokens/s", "train s", "wall s", "device", "status"]
    )
    text = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "".join("---:|" if c in NUMBERS else "---|" for c in columns),
    ]
    notes = []
    for n, j in enumerate(rows, 1):
        r = j["results"]
        cells = {
            "#": n,
            "sweep": j.get("sweep") or "-",
            "job": _job_name(j, in_sweep=True),
            "eval": (labels or {}).get(id(j), "-"),
            "final ppl": _fmt(r.get("perplexity")),
            "bits/char": _fmt(bits_per_char(j), 3),
            "EMA ppl": _fmt(_num(r.get("ema_perplexity"))),
            "best ppl": _fmt(r.get("best_perplexity")),
            "ppl before": _fmt(r.get("perplexity_before")),
            "downstream": _downstream_text(j),
            "tokens/s": _fmt(r.get("tokens_per_s"), 0),
            "train s": _fmt(r.get("train_seconds"), 0),
            "wall s": _fmt(r.get("wall_seconds"), 0),
            "device": _device(r),
            "status": _status(j, n, notes),
        }
        cells.update({k: _short(setting(j, k)) for k in keys})
        text.append("| " + " | ".join(_cell(cells[c]) for c in columns) + " |")
    if notes:
        text += ["", "Notes:", ""] + [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(text)


NUMBERS = {
    "#",
    "final ppl",
    "bits/char",
    "EMA ppl",
    "best ppl",
    "ppl before",
    "tokens/s",
    "train s",
    "wall s",
}  # right-aligned


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")  # a | would end the cell


def _status(job: Dict[str, Any], row: int, notes: List[str]) -> str:
    """ok, failed: <why>, or what became of an unfinished job; a reason longer than STATUS_WIDTH is cut at a word, and
    given whole in a note (appended to `notes`)."""
    if job.get("unfinished"):
        return job["unfinished"]
    why = failure(job)
    if why is None:
        return "ok"
    if len(why) <= STATUS_WIDTH:
        return f"failed: {why}"
    notes.append(f"row {row} ({_job_name(job)}): {why}")
    return f"failed: {textwrap.shorten(why, STATUS_WIDTH, placeholder=' ...')} (note {len(notes)})"


def _short(value: Any) -> str:
    """A swept value for a table cell or a label: 0.011536162338241389 -> 0.01154, 3e-05 -> 3e-5; text as it is."""
    number = _num(value)
    if number is None or not math.isfinite(number) or len(str(value)) <= 7:  # text, or a number as short as typed
        return str(value)
    return _plain(float(f"{number:.4g}"))


def _plain(v: float) -> str:
    """A number without 10^x notation: 30000, 0.5, 2e-5 (a tick label, a table cell)."""
    return f"{v:g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def fixed_settings(jobs: List[Dict[str, Any]]) -> List[str]:
    """The overrides every job shares (key=value), in the first job's order: said once above the table."""
    if not jobs:
        return []
    return [f"{k}={v}" for k, v in jobs[0]["overrides"].items() if all(j["overrides"].get(k) == v for j in jobs)]


def eval_text(flat: Dict[str, Any]) -> Optional[str]:
    """What a perplexity was measured on, in words: '16 held-out blocks of 32 tokens from local corpus.txt (test_size 0.2),
    15% token masks'; None for a job that recorded no config. The exact keys are eval_settings'; this names the ones a
    reader compares."""
    if "block_size" not in flat or "dataset.kind" not in flat:
        return None
    kind, path = str(flat.get("dataset.kind", "?")), flat.get("dataset.path")
    source = f"{kind} {Path(str(path)).name if kind == 'local' else path}" if path else kind
    if flat.get("dataset.config_name"):
        source += f"/{flat['dataset.config_name']}"
    held = (
        f"first {flat.get('dataset.streaming_eval_docs')} documents"
        if flat.get("dataset.streaming")
        else f"test_size {flat.get('dataset.test_size', '?')}"
    )
    blocks = flat.get("trainer.max_eval_blocks")
    rate = _num(flat.get("masking.mlm_probability"))
    return (
        f"{blocks if blocks is not None else 'all'} held-out blocks of {flat.get('block_size', '?')} tokens from {source} ({held}), "
        f"{_plain(rate * 100) + '%' if rate is not None else '?'} {flat.get('masking.eval_strategy', '?')} masks"
    )


def sweep_names(dirs: List[Path]) -> Dict[Path, str]:
    """A short name for each directory: the fewest trailing path parts that tell them apart (outputs/multirun/2026-12-06/10-00-00
    and .../11-00-00 -> 10-00-00 and 11-00-00)."""
    paths = [Path(d) for d in dirs]
    parts = [Path(d).resolve().parts for d in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(set(map(str, paths))):
            return dict(zip(paths, names))
    return {p: str(p) for p in paths}


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def best_lines(
    groups: List[List[Dict[str, Any]]],
    swept: List[str],
    what: str,
    evals: str,
    settings_of,
    score_text,
    prefix: str = "",
) -> List[str]:
    """The best of each group of comparable jobs (groups sorted best first), named by its `swept` keys: one "Best" line
    where all compare; else a line naming the keys that differ, then each group's settings of those keys and its best."""
    if len(groups) == 1:
        return [f"{what}: `{_best_name(groups[0][0], swept)}` with {score_text(groups[0][0])}."]
    keys = differing_keys(groups, settings_of)
    lines = [
        f"Not comparable: the jobs' {evals} differ in {', '.join(keys)}; "
        f"each group is ranked on its own, and no job is best across groups:",
        "",
    ]
    for i, g in enumerate(groups):
        values = group_settings(g, settings_of)
        lines.append(
            f"- {prefix}{group_label(i)} ({len(g)} job(s): {', '.join(_job_name(j) for j in g)}): "
            + " ".join(f"{k}={_value(values.get(k, UNKNOWN))}" for k in keys)
            + f"; best `{_best_name(g[0], swept)}` with {score_text(g[0])}."
        )
    return lines


def _best_name(job: Dict[str, Any], keys: List[str] = ()) -> str:
    """The job's swept settings as overrides, exactly (to paste on a command line); all its overrides where none are swept."""
    swept = [f"{k}={job['overrides'][k]}" for k in keys if k in job["overrides"]]
    return " ".join(swept or [f"{k}={v}" for k, v in job["overrides"].items()]) or job["dir"].name


def _job_name(job: Dict[str, Any], in_sweep: bool = False) -> str:
    """The job's directory relative to its sweep (the directory it was found under), after its sweep's name in a summary of
    several unless `in_sweep` (a table with a sweep column)."""
    root = job.get("root", job["dir"])
    own = str(job["dir"].relative_to(root)) if job["dir"] != root and root in job["dir"].parents else job["dir"].name
    return f"{job['sweep']}/{own}" if job.get("sweep") and not in_sweep else own


def setting(job: Dict[str, Any], key: str) -> Any:
    """The job's value of a swept key: its override, else what its config had (a key another sweep of the summary
    varied), else '-'."""
    if key in job["overrides"]:
        return job["overrides"][key]
    flat = job_settings(job)
    return _value(flat[key]) if key in flat else "-"  # null as a command line writes it


def _swept_text(job: Dict[str, Any], keys: List[str]) -> str:
    return " ".join(f"{k}={job['overrides'].get(k, '-')}" for k in keys) or "-"


def downstream_accuracy(job: Dict[str, Any]) -> Optional[float]:
    """The job's downstream accuracy (the median over its fine-tuning seeds), or None."""
    value = (job["results"].get("downstream") or {}).get("accuracy")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _downstream_text(job: Dict[str, Any]) -> str:
    acc = downstream_accuracy(job)
    return "-" if acc is None else f"{job['results']['downstream'].get('task', '?')} {acc:.3f}"


def _device(results: Dict[str, Any]) -> str:
    """cuda:3, cpu, or cpu slot 1 (a CPU pool's slot): what the job trained on, x processes."""
    device = results.get("device")
    if device is None:
        return "-"
    if results.get("device_slot") is not None and not device.startswith("cuda"):
        device += f" slot {results['device_slot']}"
    n = results.get("processes") or 1
    return f"{device} x{n}" if n > 1 else device


NO_SETTING = ("hparams_search",)  # an override that sets only hydra.* (the sweeper), nothing a job trains with


def swept_keys(jobs: List[Dict[str, Any]]) -> List[str]:
    """The override keys whose values differ between the jobs (one some jobs lack included)."""
    keys = sorted({k for j in jobs for k in j["overrides"] if k not in NO_SETTING})
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]


PANELS_PER_ROW = 3  # swept-key panels in a row of summary.png; more keys wrap to the next row
SWEEP_MARKERS = "osD^vP"  # a marker shape per sweep, in a summary of several
CURVES = 10  # jobs drawn in colour, with a legend entry, in summary.png's curves (the best of each eval first); the others grey


def plot_sweep(
    jobs: List[Dict[str, Any]], path: Path, unfinished: List[Dict[str, Any]] = (), ranking: Optional[tuple] = None
) -> None:
    """summary.png: the final eval score against each swept key (a panel per key, PANELS_PER_ROW to a row, one shared y),
    each finished job a point coloured by its eval (shaped by its sweep where there are several), the best one ringed,
    failed and unfinished jobs marked along the top at their settings; below, the eval-score curves and the smoothed
    train-loss curves, each job labelled with its row (#) of summary.md. The legends sit outside the data.
    `ranking`: ranked(jobs), where the caller has it. The score is perplexity, or bits per character where tokenizers
    differ and every job has it (score); the title says where perplexity stands in for it."""
    groups, failed = ranking = ranking or ranked(jobs)
    rows = in_rows(ranking, unfinished)
    keys = swept_keys(rows) or ["job"]
    measure, curve, words = score(groups)
    ok = [j for g in groups for j in g if _num(j["results"].get(measure)) is not None]
    style = {id(j): {"color": f"C{i % 10}", "marker": SWEEP_MARKERS[0]} for i, g in enumerate(groups) for j in g}
    sweeps = list(dict.fromkeys(j.get("sweep") for j in rows))
    for j in ok:  # one shape per sweep
        style[id(j)]["marker"] = SWEEP_MARKERS[sweeps.index(j.get("sweep")) % len(SWEEP_MARKERS)]
    per_row = min(len(keys), PANELS_PER_ROW)
    key_rows = math.ceil(len(keys) / per_row)
    plt = pyplot()
    fig = plt.figure(figsize=(14, 1.4 + 3.3 * key_rows + 3.8), layout="constrained")
    grid = fig.add_gridspec(key_rows + 1, 6, height_ratios=[3.3] * key_rows + [3.8])
    span = 4 if per_row == 1 else 6 // per_row  # a lone panel as wide as the two curve panels below it
    panels = []
    for i, key in enumerate(keys):
        row, col = divmod(i, per_row)
        ax = fig.add_subplot(grid[row, col * span : (col + 1) * span], sharey=panels[0] if panels else None)
        panels.append(ax)
        key_panel(ax, key, ok, failed + list(unfinished), style, measure)
        if col:
            ax.tick_params(labelleft=False)  # the shared y is labelled once per row
        else:
            ax.set_ylabel(f"final eval {words}")
    if ok:
        plain_scale(panels[0], "y", [j["results"][measure] for j in ok])
    else:
        panels[0].set_yticks([])  # no score to show
    number = {id(j): n for n, j in enumerate(rows, 1)}
    group_of = {id(j): group_label(i) for i, g in enumerate(groups) for j in g} if len(groups) > 1 else {}
    legend = _point_legend(groups, sweeps, ok, failed, unfinished, number)
    curve_panels(fig, grid, ok, number, keys, group_of, legend, (measure, curve, words))
    fig.suptitle(_sweep_title(jobs, unfinished, groups, words), fontsize=12)
    unoverlap_ticks(fig, panels)
    save_png(fig, path)


def key_panel(
    ax,
    key: str,
    ok: List[Dict[str, Any]],
    others: List[Dict[str, Any]],
    style: Dict[int, Dict[str, str]],
    measure: str = "perplexity",
) -> None:
    """The final eval score (`measure` of results.json: perplexity or bits_per_char, score's) of the `ok` jobs against
    their value of `key`; the `others` (failed, unfinished) at the top."""
    from matplotlib.transforms import ScaledTranslation

    def value(j):
        if key == "job":
            return j["dir"].name
        v = setting(j, key)
        return None if v == "-" else v  # a job of another sweep may have no value for this key

    known = [j for j in ok + others if value(j) is not None]
    numeric = bool(known) and all(_num(value(j)) is not None for j in known)
    categories = sorted({str(value(j)) for j in known})

    def x(j):
        return _num(value(j)) if numeric else categories.index(str(value(j)))

    for shape in dict.fromkeys(style[id(j)]["marker"] for j in ok):
        mine = [j for j in ok if style[id(j)]["marker"] == shape and value(j) is not None]
        ax.scatter(
            [x(j) for j in mine],
            [j["results"][measure] for j in mine],
            c=[style[id(j)]["color"] for j in mine],
            marker=shape,
            s=36,
            zorder=3,
        )
    if ok and value(ok[0]) is not None:  # the best job (of the largest eval group), ringed
        ax.scatter(
            [x(ok[0])],
            [ok[0]["results"][measure]],
            s=170,
            facecolors="none",
            edgecolors="black",
            linewidths=1.4,
            zorder=4,
        )
    top = ax.get_xaxis_transform()  # x in data, y in axes: along the top, whatever the perplexities
    marks = (
        ("failed", -4, dict(marker="x", color="black")),
        ("unfinished", 4, dict(marker="o", facecolors="none", edgecolors="0.45")),
    )
    for outcome, shift, mark in marks:
        mine = [j for j in others if value(j) is not None and (bool(j.get("unfinished")) == (outcome == "unfinished"))]
        if mine:  # side by side where a failed and an unfinished job share a value
            ax.scatter(
                [x(j) for j in mine],
                [0.95] * len(mine),
                transform=top + ScaledTranslation(shift / 72, 0, ax.figure.dpi_scale_trans),
                s=40,
                zorder=3,
                clip_on=False,
                **mark,
            )
    ax.margins(x=0.1, y=0.16)  # room for the marks along the top
    if numeric and known:
        # the marks along the top count for the x range too
        ax.dataLim.update_from_data_x([x(j) for j in known], ignore=False)
        plain_scale(ax, "x", [x(j) for j in known], exact=True)
    else:
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_xlabel(key)
    ax.grid(alpha=0.3)


def plain_scale(ax, which: str, values: List[float], exact: bool = False) -> None:
    """A log scale where the values span 3x or more; plain tick labels either way (3000, 0.001, 2e-5; never 3x10^3).
    `exact`: ticks at the values themselves where there are a few (a grid's values)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = min(values), max(values)
    if lo > 0 and hi / lo >= 3:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        decades = math.log10(hi / lo)
        wide = 2 if which == "y" else 1  # a y axis has room for 3s within one or two decades; a panel's x axis has not
        subs = (
            (1.0,)
            if decades > 4
            else (1.0, 2.0, 5.0)
            if decades >= wide
            else (1.0, 2.0, 3.0, 5.0)
            if decades >= 0.7
            else (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
        )
        axis.set_major_locator(LogLocator(subs=subs))
        axis.set_minor_formatter(NullFormatter())
    distinct = sorted(set(values))
    # a grid's values (Optuna's draws are not)
    if exact and len(distinct) <= 6 and all(v == float(f"{v:.3g}") for v in distinct):
        axis.set_major_locator(FixedLocator(distinct))
        axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: _plain(float(f"{v:.6g}"))))


def unoverlap_ticks(fig, axes) -> None:
    """Turn an axis's x tick labels upright where they overlap side by side (long categories, dense values)."""
    fig.canvas.draw()
    for ax in axes:
        if _overlapping(ax.xaxis):
            ax.tick_params(axis="x", labelrotation=90)
            fig.canvas.draw()
            if _overlapping(ax.xaxis):
                ax.tick_params(axis="x", labelsize=7)


def _overlapping(axis) -> bool:
    """Whether two of the axis's drawn tick labels (those within its view) overlap."""
    lo, hi = sorted(axis.get_view_interval())
    labels = [
        t for loc, t in zip(axis.get_majorticklocs(), axis.get_majorticklabels()) if lo <= loc <= hi and t.get_text()
    ]
    boxes = [t.get_window_extent() for t in labels]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def short_keys(keys: List[str]) -> Dict[str, str]:
    """Each key by its last part (optimizer.lr -> lr) where that names it alone among `keys`."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def curve_panels(
    fig,
    grid,
    ok: List[Dict[str, Any]],
    number: Dict[int, int],
    keys: List[str],
    group_of: Dict[int, str],
    points: list,
    measured: tuple = ("perplexity", "eval/perplexity", "perplexity"),
) -> None:
    """The bottom row of summary.png: eval perplexity (`measured`: score's) and smoothed train loss against the step,
    and beside them one legend:
    the panels' `points`, then the curves (each job by its row in summary.md, its eval group where there are several:
    `group_of`, and its swept settings where they fit on a line)."""
    from matplotlib.lines import Line2D

    def header(text):
        return Line2D([], [], ls="none", label=text)

    evals, losses, slot = (fig.add_subplot(grid[-1, 2 * i : 2 * i + 2]) for i in range(3))
    shown = ok[:CURVES]
    for i, j in enumerate(ok):
        look = dict(color=f"C{i % 10}", lw=1.6, zorder=3) if i < CURVES else dict(color="0.75", lw=0.8, zorder=2)
        x, y = _series(j["metrics"], measured[1])
        evals.plot(x, y, marker="o", markersize=3 if len(x) > 1 else 6, **look)
        x, y = _series(j["metrics"], "train/loss")
        losses.plot(x, smoothed(y), marker="o" if len(x) == 1 else None, markersize=6, **look)  # one point: a marker
    labels = [f"#{number[id(j)]}" + (f" (eval {group_of[id(j)]})" if group_of else "") for j in shown]
    names = short_keys(keys)
    settings = [
        ", ".join(f"{names[k]}={_short(j['overrides'][k])}" for k in keys if k in j["overrides"]) for j in shown
    ]
    if all(len(f"{l}: {s}") <= 60 for l, s in zip(labels, settings)):
        labels = [f"{l}: {s}" if s else l for l, s in zip(labels, settings)]
    else:  # the settings are in summary.md's row
        labels = [f"{l}: {measured[2]} {_fmt(j['results'][measured[0]])}" for l, j in zip(labels, shown)]
    handles = ([header("the panels above:")] + points if points else []) + (
        [header("the curves (row # of summary.md):")] if shown else []
    )
    handles += [Line2D([], [], color=f"C{i % 10}", lw=2, label=label) for i, label in enumerate(labels)]
    if len(ok) > CURVES:
        handles.append(Line2D([], [], color="0.75", lw=1, label=f"{len(ok) - CURVES} other jobs"))
    eval_values = [v for j in ok for v in _series(j["metrics"], measured[1])[1]]
    if eval_values:
        plain_scale(evals, "y", eval_values)
    evals.set_title(f"eval {measured[2]}", fontsize=10)
    losses.set_title("train loss (smoothed)", fontsize=10)
    for ax in (evals, losses):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if not ok:
            ax.text(0.5, 0.5, "no job finished", transform=ax.transAxes, ha="center", va="center", color="0.4")
    slot.axis("off")
    slot.legend(handles=handles, loc="upper left", fontsize=8, frameon=False, ncols=2 if len(handles) > 20 else 1)


def _point_legend(groups, sweeps, ok, failed, unfinished, number) -> list:
    """The panels' legend: the eval groups (colours), the sweeps (shapes), the best job's ring, failed and unfinished marks."""
    from matplotlib.lines import Line2D

    def mark(label, **kw):
        return Line2D([], [], ls="", label=label, **{"markersize": 7, **kw})

    if len(groups) > 1:
        out = [mark(f"eval {group_label(i)}", marker="o", color=f"C{i % 10}") for i in range(len(groups))]
    else:
        out = [mark("finished job", marker="o", color="C0")] if ok else []
    if len(sweeps) > 1:
        out += [
            mark(f"sweep {s}", marker=SWEEP_MARKERS[i % len(SWEEP_MARKERS)], color="0.35") for i, s in enumerate(sweeps)
        ]
    if ok:
        out.append(
            mark(
                f"best: #{number[id(ok[0])]}",
                marker="o",
                markerfacecolor="none",
                markeredgecolor="black",
                markersize=12,
            )
        )
    if failed:
        out.append(mark(f"failed ({len(failed)})", marker="x", color="black"))
    if unfinished:
        out.append(mark(f"unfinished ({len(unfinished)})", marker="o", markerfacecolor="none", markeredgecolor="0.45"))
    return out


def _sweep_title(jobs, unfinished, groups, words: str = "perplexity") -> str:
    """Which sweep(s), how their jobs ended, what the scores (`words`: score's) were measured on, and where perplexity
    is plotted for a group ranked by bits per character (a job of another group lacks it), that it is not compared."""
    everyone = list(jobs) + list(unfinished)
    names = list(dict.fromkeys(j.get("sweep") or str(j.get("root", j["dir"])) for j in everyone))
    where = f"sweep {names[0]}" if len(names) == 1 else f"{len(names)} sweeps: {', '.join(names)}"
    if len(groups) > 1:
        scored = f"evals differ in {', '.join(differing_keys(groups))}: compare {words} within one colour only"
    else:
        scored = f"eval: {eval_text(job_settings(groups[0][0])) or '(not recorded)'}" if groups else "no job finished"
    mixed = [group_label(i) for i, g in enumerate(groups) if by_characters(g)]
    if mixed and words == "perplexity":
        scored += (
            f"\nperplexity plotted (not every job has bits per character): eval {', '.join(mixed)} mixes tokenizers, "
            "so its perplexities are not compared (summary.md ranks it by bits per character)"
        )
    return f"{where} ({outcome_text(jobs, unfinished)})\n{scored}"


def smoothed(values: List[float], weight: Optional[float] = None) -> List[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start. The weight grows with the number
    of points (0.6, TensorBoard's default, for a few; 0.98 for thousands) so that a long run's curve is as readable as a short one's."""
    if weight is None:
        weight = smoothing_weight(len(values))
    out, last = [], 0.0
    for i, v in enumerate(values, 1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


def smoothing_weight(points: int) -> float:
    return min(0.98, max(0.6, 1 - 20 / max(points, 1)))


def summarize(dirs: List[Path], out_dir: Optional[Path] = None, curves: bool = False) -> Optional[Path]:
    """Write summary.md and summary.png into `out_dir` (default: the first directory); None where no job was found.
    `curves`: redraw each job's curves.png too, titled with its swept settings."""
    dirs = [Path(d) for d in dirs]
    out_dir = Path(out_dir or dirs[0])
    jobs, unfinished = collect(dirs)
    if not jobs and not unfinished:
        return None
    if len(set(dirs)) > 1:  # each job names its sweep
        names = sweep_names(dirs)
        for j in jobs + unfinished:
            j["sweep"] = names[j["root"]]
    groups, _ = ranking = ranked(jobs)
    swept = swept_keys(jobs + unfinished)
    text = header_lines(dirs, jobs, unfinished, groups) + ["", summary_table(ranking, unfinished), ""]
    if groups:
        text += best_lines(
            groups,
            swept,
            "Best",
            "evals",
            job_eval_settings,
            lambda j: score_text(j, groups),
            "eval ",
        )
    scored = [j for g in groups for j in g if downstream_accuracy(j) is not None]
    if scored:
        by_task = [
            sorted(g, key=downstream_accuracy, reverse=True) for g in comparable_groups(scored, job_downstream_settings)
        ]
        text += [""] + best_lines(
            by_task,
            swept,
            "Best downstream",
            "downstream evals",
            job_downstream_settings,
            lambda j: f"{_downstream_text(j)} (median of {len(j['results']['downstream'].get('seeds', []))} seeds)",
            "downstream eval ",
        )
    text.append("\n![summary](summary.png)\n")
    budget = budget_sweep(jobs, groups)
    if budget:
        if len(groups) > 1:
            text.append(
                f"The Pareto fronts below compare the jobs of eval A only ({len(budget)} job(s)): a front never mixes evals.\n"
            )
        text += [front_tables(budget), "![budget](budget.png)\n"]
    atomic_write_text(out_dir / "summary.md", "\n".join(text))
    plot_sweep(jobs, out_dir / "summary.png", unfinished, ranking)
    for j in (jobs + unfinished) if curves else ():
        try:
            plot_run(j["dir"], swept or None, j["metrics"])
        except OSError as e:  # a job directory this user cannot write: its own curves.png stays
            print(f"could not redraw {j['dir'] / 'curves.png'}: {e}", file=sys.stderr)
    if budget:
        plot_budget(budget, out_dir / "budget.png")
    return out_dir / "summary.md"


def header_lines(dirs: List[Path], jobs: List[Dict[str, Any]], unfinished: List[Dict[str, Any]], groups) -> List[str]:
    """summary.md's top: the sweeps, the jobs' outcomes, the overrides they all share (once, not in every row), and the
    eval (`groups`: ranked()'s)."""
    everyone = jobs + unfinished
    if len(set(dirs)) > 1:
        names = sweep_names(dirs)
        lines = [
            f"# Summary of {len(set(dirs))} sweeps",
            "",
            "Sweeps: "
            + "; ".join(
                f"`{names[d]}` = {d} ({sum(j['root'] == d for j in everyone)} jobs)" for d in dict.fromkeys(dirs)
            )
            + ".",
        ]
    else:
        lines = [f"# Sweep summary: {dirs[0]}"]
    lines += ["", f"{outcome_text(jobs, unfinished)}."]
    fixed = fixed_settings(everyone)
    if fixed:
        lines += ["", f"Fixed settings (the overrides every job shares): `{' '.join(fixed)}`"]
    mixed = [group_label(i) for i, g in enumerate(groups) if by_characters(g)]
    if mixed:
        lines += ["", tokenizers_line(mixed, len(groups))]
    if len(groups) > 1:
        lines += ["", "Evals: they differ between jobs (below); each group (column `eval`) is ranked on its own."]
    elif groups and eval_text(job_settings(groups[0][0])):
        lines += ["", f"Eval: {eval_text(job_settings(groups[0][0]))}."]
    return lines


def tokenizers_line(labels: List[str], n_groups: int) -> str:
    """The one line that says a ranking is by bits per character (`labels`: the groups so ranked, of `n_groups`)."""
    which = "the jobs" if n_groups == 1 else f"the jobs of eval {', '.join(labels)}"
    return (
        f"Tokenizers differ between {which}: ranked by bits per character of the masked tokens (column bits/char; "
        "docs/bits-per-char.md); perplexities are per token, so they are not compared across tokenizers."
    )


def outcome_text(jobs: List[Dict[str, Any]], unfinished: List[Dict[str, Any]]) -> str:
    """'6 jobs: 4 ok, 1 failed, 1 unfinished', or '6 jobs, all ok'."""
    failed = sum(failure(j) is not None for j in jobs)
    total = len(jobs) + len(unfinished)
    counted = f"{total} job{'s' if total != 1 else ''}"
    if not failed and not unfinished:
        return f"{counted}, all ok"
    parts = (
        [f"{len(jobs) - failed} ok"]
        + ([f"{failed} failed"] if failed else [])
        + ([f"{len(unfinished)} unfinished"] if unfinished else [])
    )
    return f"{counted}: {', '.join(parts)}"


# ---------------------------------------------------------------- what each minute buys: quality against compute

BUDGET_KEYS = ("trainer.budget_minutes", "trainer.max_steps")  # a sweep over either gets budget.png and Pareto tables
COMPUTE = (("train_tokens", "training tokens"), ("train_seconds", "training seconds"))


def budget_sweep(jobs: List[Dict[str, Any]], groups) -> List[Dict[str, Any]]:
    """The succeeded jobs of a sweep that varies the training budget (with their compute measured), else []:
    those of the largest group of comparable evals (group A of the summary; `groups`: ranked()'s)."""
    if not set(BUDGET_KEYS) & set(swept_keys(jobs)):
        return []
    return [j for j in (groups or [[]])[0] if all(_num(j["results"].get(k)) is not None for k, _ in COMPUTE)]


def pareto_front(points: List[tuple], higher_is_better: bool = False) -> List[int]:
    """Indices of the (compute, quality) points that no other point beats with as little compute or less,
    by compute: each one strictly better than every point left of it (of equal compute, the better one only)."""
    sign = -1 if higher_is_better else 1
    front, best = [], math.inf
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1])):
        if sign * points[i][1] < best:
            front.append(i)
            best = sign * points[i][1]
    return front


def _qualities(jobs: List[Dict[str, Any]]) -> List[tuple]:
    """(label, value of a job or None, higher is better) of each quality the jobs have."""
    measure, _, words = score([jobs])  # one group of comparable jobs: per character where their tokenizers differ
    out = [(f"eval {words}", lambda j: j["results"][measure], False)]
    groups = comparable_groups([j for j in jobs if downstream_accuracy(j) is not None], job_downstream_settings)
    if groups:  # the largest group of one downstream eval: a front never mixes tasks
        members = {id(j) for j in groups[0]}
        task = groups[0][0]["results"]["downstream"].get("task", "?")
        out.append(
            (f"{task} accuracy (median of seeds)", lambda j: downstream_accuracy(j) if id(j) in members else None, True)
        )
    return out


def front_tables(jobs: List[Dict[str, Any]]) -> str:
    """Markdown: per quality, the jobs on its Pareto front against training time, and what each extra minute bought."""
    text, swept = [], swept_keys(jobs)
    for label, value, higher in _qualities(jobs):
        scored = [j for j in jobs if value(j) is not None]
        front = [scored[i] for i in pareto_front([(j["results"]["train_seconds"], value(j)) for j in scored], higher)]
        text += [
            f"Pareto front, {label} against training time ({len(front)} of {len(scored)} jobs; no job does better in less time):",
            "",
            "| job | swept | train s | train tokens | " + label + " | change per extra minute |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for before, j in zip([None] + front, front):
            r = j["results"]
            gain = (
                "-"
                if before is None
                else f"{(value(j) - value(before)) / max((r['train_seconds'] - before['results']['train_seconds']) / 60, 1e-9):+.3g}"
            )
            text.append(
                f"| {_job_name(j)} | {_swept_text(j, swept)} | {r['train_seconds']:.3g} | {int(r['train_tokens']):,} | "
                f"{value(j):.{2 if label == 'eval perplexity' else 3}f} | {gain} |"
            )
        text.append("")
    return "\n".join(text)


def _compact(v: float) -> str:
    """1234567 -> 1.2M, 24000 -> 24k, 90.5 -> 90: tick labels that fit under a panel."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def plot_budget(jobs: List[Dict[str, Any]], path: Path) -> None:
    """budget.png: each quality against training tokens and training time, every job a point, the Pareto front a step line."""
    qualities = _qualities(jobs)
    keys = [k for k in BUDGET_KEYS if k in swept_keys(jobs)]
    plt = pyplot()
    fig, axes = plt.subplots(len(qualities), 2, figsize=(11, 4.2 * len(qualities)), squeeze=False)
    for row, (label, value, higher) in zip(axes, qualities):
        scored = [j for j in jobs if value(j) is not None]
        for ax, (compute, xlabel) in zip(row, COMPUTE):
            points = [(float(j["results"][compute]), value(j)) for j in scored]
            front = pareto_front(points, higher)
            ax.scatter([p[0] for p in points], [p[1] for p in points], color="0.65", label="job", zorder=2)
            fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
            xs = [p[0] for p in points]
            # the best reached with at most x compute: flat to the next front point, and on to the largest budget
            ax.step(fx + [max(xs, default=0)], fy + fy[-1:], where="post", color="C3", zorder=3)
            ax.scatter(fx, fy, color="C3", s=45, label="Pareto front", zorder=4)
            for (x, y), j in zip(points, scored):
                ax.annotate(
                    ",".join(f"{k.split('.')[-1]}={j['overrides'].get(k)}" for k in keys),
                    (x, y),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            if xs and min(xs) > 0 and max(xs) / min(xs) >= 3:
                ax.set_xscale("log")
            ticks = sorted(set(xs))  # label the jobs' own values, compactly (24k, 1.2M)
            ax.set_xticks(ticks, [_compact(t) for t in ticks], rotation=30 if len(ticks) > 5 else 0)
            ax.minorticks_off()
            ax.margins(x=0.12, y=0.1)  # room for the labels of the outermost points
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(
                f"{label.split(' (')[0]} vs {xlabel}" + (" (higher is better)" if higher else " (lower is better)")
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"what the training budget buys: {len(jobs)} job(s), swept {', '.join(keys)}")
    fig.tight_layout()
    save_png(fig, path)


# ---------------------------------------------------------------- an Optuna study compares like with like


def search_space(config: DictConfig) -> List[str]:
    """The sweep overrides an Optuna study searches: hydra.sweeper.params, and the command line's, which win."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.to_container(config.hydra.sweeper.get("params") or {}, resolve=False)
    lines = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    space = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(lines)}  # the last of a key wins
    return [o.input_line for o in space.values() if o.is_sweep_override()]


def eval_sweeps(space: List[str], config: DictConfig) -> List[str]:
    """Which of the sweep overrides `space` would score trials of the (multirun) `config` on different evals, each
    as 'key (what differs)': a key that sets the eval, or a config group whose options differ in one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mlm.config import GROUPS
    from mlm.rundir import flat_settings

    base = flat_settings(config) or {}
    found = []
    for override in OverridesParser.create().parse_overrides(space):
        key = override.get_key_element()
        if key in eval_keys(base) and not is_tokenizer_setting(key):  # tokenizers compare by bits per character
            found.append(f"{override.input_line} (an eval setting, {base.get(key)} in the config)")
        elif key in GROUPS:
            differ = _group_eval_differences(config, key, [str(v) for v in override.sweep_string_iterator()])
            if differ:
                found.append(f"{key} (its options' evals differ in {', '.join(differ)})")
    return found


def _group_eval_differences(config: DictConfig, group: str, options: List[str]) -> List[str]:
    """The eval keys in which the configs composed with each option of `group` differ (as the launcher composes a trial)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mlm.rundir import flat_settings

    loader = GlobalHydra.instance().config_loader()
    fixed = [
        o.input_line
        for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        if not o.is_sweep_override() and o.get_key_element() != group
    ]
    values = [
        eval_settings(flat_settings(loader.load_sweep_config(config, fixed + [f"{group}={option}"])) or {})
        for option in options
    ]
    return [
        k
        for k in values[0]
        if not is_tokenizer_setting(k) and len({json.dumps(v.get(k), default=str) for v in values}) > 1
    ]


def check_search_space(config: DictConfig) -> None:
    """An Optuna study ranks its trials by eval bits per character (mlm.cli.objective): one whose search space varies
    the eval text or masks is refused in one line (UserError) before any trial runs; one that varies the tokenizer is
    not. Other sweepers rank nothing; their summary groups the evals."""
    if "optuna" not in str(config.hydra.sweeper.get("_target_", "")).lower():
        return
    found = eval_sweeps(search_space(config), config)
    if found:
        raise UserError(
            f"hparams_search=optuna would rank trials scored on different evals: its search space varies {'; '.join(found)}; "
            "give it one value for the study, or sweep it without Optuna (python run.py -m key=a,b), whose summary ranks each eval on its own"
        )


class SweepSummaryCallback(Callback):
    """Hydra callback: refuse an Optuna search over eval settings when a multirun starts; summarise the sweep
    directory when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from mlm.placement import is_main_process
        from mlm.errors import exit_on_user_error, stderr

        # every rank decides alike (a torchrun around a study runs a sampler on each); the main process says it
        with exit_on_user_error(say=stderr if is_main_process() else None):
            check_search_space(config)

    def on_multirun_end(self, config, **kwargs) -> None:
        from mlm.placement import is_main_process

        if not is_main_process():
            return
        path = summarize([Path(config.hydra.sweep.dir)], curves=True)
        if path:
            print(f"sweep summary: {path}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlm.report", description="Summarise runs and sweeps: summary.md + summary.png"
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first directory)")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)  # a new directory for a summary of several sweeps
    path = summarize(args.dirs, args.out, curves=True)  # each run's curves refreshed too
    if path is None:
        print("no job directories (with results.json, error.txt or .hydra/overrides.yaml) found", flush=True)
        return 1
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
