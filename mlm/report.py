"""Run curves and sweep summaries.

- `plot_run(run_dir)`: curves.png beside metrics.jsonl (train loss, eval perplexity, lr).
- `python -m mlm.report <sweep or run dirs...>`: summary.md (one row per job, sorted by
  perplexity; a downstream column where jobs have one) and summary.png (perplexity against each
  swept value, and the curves). A sweep over trainer.budget_minutes or trainer.max_steps also gets
  budget.png (perplexity and downstream accuracy against training tokens and time, the Pareto
  front marked) and a table of each front in summary.md: what each minute buys.
  Hydra calls the same at the end of every multirun (SweepSummaryCallback in conf/config.yaml).
- Only like with like is ranked: jobs whose evals differ (EVAL_KEYS: held-out text, blocks, tokenizer,
  eval masks) are ranked in separate groups, never across, and the summary names the keys that differ.
  At the start of a multirun the same callback refuses an Optuna search space that varies an eval key.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
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


def _series(records: List[Dict[str, Any]], key: str):
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: Path) -> Optional[Path]:
    """curves.png: train loss, eval perplexity (log scale) and learning rate against the optimizer step."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("train/loss", "eval/perplexity", "train/lr"), ("train loss (masked tokens)", "eval perplexity", "learning rate")):
        x, y = _series(records, key)
        ax.plot(x, y, marker="o" if key.startswith("eval") or len(x) == 1 else None, markersize=4)  # one point: a marker
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if key == "eval/perplexity" and y and min(y) > 0:
            ax.set_yscale("log")
            ax.annotate(f"{y[-1]:.1f}", (x[-1], y[-1]), textcoords="offset points", xytext=(-10, 8))
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / "curves.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _overrides(job_dir: Path) -> List[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    import yaml

    try:  # Hydra writes this file in place: a job killed in that instant leaves it torn (its rerun rewrites it)
        overrides = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return []
    return [o for o in overrides if isinstance(o, str) and not o.startswith("hydra")]


def _trained_with(overrides: Dict[str, str], trained: Dict[str, Any]) -> Dict[str, str]:
    """The overrides, with the values the results were trained with where those differ.

    Hydra rewrites .hydra/overrides.yaml at every launch, also for a job that then refuses to
    run (a sweep rerun into the same directory with other values); results.json keeps the truth.
    """
    def same(a, b):
        na, nb = _num(a), _num(b)
        return na == nb if na is not None and nb is not None else str(a).lower() == str(b).lower()

    return {k: v if k not in trained or same(v, trained[k]) else str(trained[k]) for k, v in overrides.items()}


def collect_jobs(dirs: List[Path]) -> List[Dict[str, Any]]:
    """Every job directory (one with results.json or error.txt) under the given directories."""
    jobs = []
    for root in dirs:
        candidates = [root] + sorted(p for p in Path(root).rglob("*") if p.is_dir())
        for d in candidates:
            if not ((d / "results.json").exists() or (d / "error.txt").exists()):
                continue
            results = json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else {}  # written atomically
            jobs.append({
                "dir": d,
                "overrides": _trained_with(dict(o.split("=", 1) for o in _overrides(d) if "=" in o), results.get("config", {})),
                "results": results,
                "settings": results.get("config") or _snapshot_settings(d),  # the eval it was scored on
                "error": (d / "error.txt").read_text().strip() if (d / "error.txt").exists() else None,
                "metrics": read_metrics(d),
            })
    return jobs


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
    "dataset.kind", "dataset.path", "dataset.config_name", "dataset.split", "dataset.text_field", "dataset.test_size",
    "dataset.split_seed", "dataset.include_news", "dataset.max_examples", "dataset.remainder", "dataset.streaming",
    "dataset.streaming_eval_docs", "block_size", "trainer.max_eval_blocks", "model.tokenizer",  # unset: model.name_or_path's
    "masking.mlm_probability", "masking.eval_strategy", "masking.mask_replace_prob", "masking.random_replace_prob",
)
SPAN_EVAL_KEYS = ("masking.span_geometric_p", "masking.span_max_words")  # shape the eval masks only with eval_strategy=span
# What a downstream accuracy is measured on (the fine-tuning lr, epochs, batch and seeds are training's).
DOWNSTREAM_EVAL_KEYS = ("downstream.kind", "downstream.task", "downstream.path", "downstream.config_name", "downstream.text_fields",
                        "downstream.label_field", "downstream.eval_split", "downstream.folds", "downstream.max_length")
UNKNOWN = "(not recorded)"  # a key a job's saved config lacks: not assumed equal to anything


def eval_keys(flat: Dict[str, Any]) -> List[str]:
    """The flat keys whose values set the eval of a config: EVAL_KEYS, the span shape where evals mask spans,
    and model.name_or_path where it gives the tokenizer (model.tokenizer unset). eval_settings reads these."""
    keys = list(EVAL_KEYS)
    if flat.get("masking.eval_strategy") == "span":
        keys += SPAN_EVAL_KEYS
    if flat.get("model.tokenizer") is None:
        keys.append("model.name_or_path")
    return keys


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
    if malformed_data(data) is None and isinstance(data, dict) and data.get("tokenizer"):
        del values["model.tokenizer"]
        values["data.tokenizer"] = data["tokenizer"]
    return values


def job_eval_settings(job: Dict[str, Any]) -> Dict[str, Any]:
    return eval_settings(job_settings(job), job["results"].get("data"))


def downstream_settings(flat: Dict[str, Any]) -> Dict[str, Any]:
    return {k: flat.get(k, UNKNOWN) for k in DOWNSTREAM_EVAL_KEYS}


def job_downstream_settings(job: Dict[str, Any]) -> Dict[str, Any]:
    return downstream_settings(job_settings(job))


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


def differing_keys(groups: List[List[Dict[str, Any]]], settings_of=job_eval_settings) -> List[str]:
    """The eval keys whose values differ between the groups (a key one group lacks counts as differing)."""
    values = [settings_of(g[0]) for g in groups]
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
    """The succeeded jobs in groups of comparable evals (the largest first), each sorted by perplexity, and the failed jobs."""
    ok = [j for j in jobs if failure(j) is None]
    groups = [sorted(g, key=lambda j: j["results"]["perplexity"]) for g in comparable_groups(ok)]
    return groups, [j for j in jobs if failure(j) is not None]


def summary_table(jobs: List[Dict[str, Any]], root: Path) -> str:
    """One row per job: each eval group's jobs by perplexity (an `eval` column names the group where there
    are several), then the failed jobs."""
    groups, failed = ranked(jobs)
    labels = {id(j): group_label(i) for i, g in enumerate(groups) for j in g} if len(groups) > 1 else None
    downstream = any(downstream_accuracy(j) is not None for j in jobs)  # a column only where some job has one
    lines = [
        "| job | overrides |" + (" eval |" if labels else "") + " final ppl | best ppl | ppl before |" + (" downstream |" if downstream else "")
        + " tokens/s | train s | wall s | device | status |",
        "|---|---|" + ("---|" if labels else "") + "---:|---:|---:|" + ("---:|" if downstream else "") + "---:|---:|---:|---|---|",
    ]
    for j in [j for g in groups for j in g] + failed:
        r = j["results"]
        status = "ok" if failure(j) is None else "failed: " + failure(j).replace("|", "/")[:80]
        lines.append(
            f"| {_job_name(j, root)} | {_overrides_text(j)} | " + (f"{labels.get(id(j), '-')} | " if labels else "")
            + f"{_fmt(r.get('perplexity'))} | "
            f"{_fmt(r.get('best_perplexity'))} | {_fmt(r.get('perplexity_before'))} | " + (f"{_downstream_text(j)} | " if downstream else "")
            + f"{_fmt(r.get('tokens_per_s'), 0)} | {_fmt(r.get('train_seconds'), 0)} | {_fmt(r.get('wall_seconds'), 0)} | {_device(r)} | {status} |"
        )
    return "\n".join(lines)


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def best_lines(groups: List[List[Dict[str, Any]]], root: Path, what: str, evals: str, settings_of, score_text, prefix: str = "") -> List[str]:
    """The best of each group of comparable jobs (groups sorted best first): one "Best" line where all compare;
    else a line naming the keys that differ, then each group's settings of those keys and its best."""
    if len(groups) == 1:
        return [f"{what}: `{_best_name(groups[0][0])}` with {score_text(groups[0][0])}."]
    keys = differing_keys(groups, settings_of)
    lines = [f"Not comparable: the jobs' {evals} differ in {', '.join(keys)}; "
             f"each group is ranked on its own, and no job is best across groups:", ""]
    for i, g in enumerate(groups):
        values = settings_of(g[0])
        lines.append(f"- {prefix}{group_label(i)} ({len(g)} job(s): {', '.join(_job_name(j, root) for j in g)}): "
                     + " ".join(f"{k}={_value(values.get(k, UNKNOWN))}" for k in keys)
                     + f"; best `{_best_name(g[0])}` with {score_text(g[0])}.")
    return lines


def _best_name(job: Dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in job["overrides"].items()) or job["dir"].name


def _job_name(job: Dict[str, Any], root: Path) -> str:
    return str(job["dir"].relative_to(root)) if job["dir"] != root and root in job["dir"].parents else job["dir"].name


def _overrides_text(job: Dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in job["overrides"].items()) or "-"


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


def swept_keys(jobs: List[Dict[str, Any]]) -> List[str]:
    keys = sorted({k for j in jobs for k in j["overrides"]})
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]


def plot_sweep(jobs: List[Dict[str, Any]], path: Path) -> None:
    """Perplexity against each swept value (one panel each), then eval-perplexity and train-loss curves."""
    keys = swept_keys(jobs) or ["job"]
    n = len(keys) + 2
    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2))
    groups, _ = ranked(jobs)
    ok = [j for g in groups for j in g]
    colours = [f"C{i % 10}" for i, g in enumerate(groups) for _ in g]  # one colour per group of comparable evals
    group_of = {id(j): group_label(i) for i, g in enumerate(groups) for j in g}
    for ax, k in zip(axes, keys):
        values = [j["overrides"].get(k, "-") if k != "job" else j["dir"].name for j in ok]
        ppl = [j["results"]["perplexity"] for j in ok]
        numeric = all(_num(v) is not None for v in values)
        if numeric and values:
            x = [_num(v) for v in values]
            ax.scatter(x, ppl, c=colours)
            if min(x) > 0 and max(x) / min(x) >= 3:
                ax.set_xscale("log")
            ticks = sorted(set(x))  # label exactly the swept values, compactly (2e-4, not 0.0002)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        else:
            cats = sorted(set(values))
            ax.scatter([cats.index(v) for v in values], ppl, c=colours)
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
        for v, p, j in zip(values, ppl, ok):
            others = ",".join(f"{kk}={vv}" for kk, vv in j["overrides"].items() if kk != k and kk in keys)
            if others:
                ax.annotate(others, ((_num(v) if numeric else sorted(set(values)).index(v)), p), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(k)
        ax.set_ylabel("final eval perplexity")
        ax.set_title(f"perplexity vs {k}")
        ax.grid(alpha=0.3)
    for ax, key, title in ((axes[-2], "eval/perplexity", "eval perplexity"), (axes[-1], "train/loss", "train loss")):
        for j in ok:
            x, y = _series(j["metrics"], key)
            label = ",".join(f"{k}={j['overrides'].get(k)}" for k in keys if k in j["overrides"]) or j["dir"].name
            label = f"{group_of[id(j)]}: {label}" if len(groups) > 1 else label  # which eval the curve is on
            # a curve of one point (a 10-step job logging every 10 steps) is a marker, not an invisible line
            ax.plot(x, y, marker="o" if key.startswith("eval") or len(x) == 1 else None, markersize=6 if len(x) == 1 else 3, label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if key == "eval/perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if ok:
        axes[-1].legend(fontsize=7, loc="upper right")
    failed = len(jobs) - len(ok)
    title = f"{len(ok)} job(s)" + (f", {failed} failed" if failed else "")
    if len(groups) > 1:
        from matplotlib.lines import Line2D

        axes[0].legend(handles=[Line2D([], [], marker="o", ls="", color=f"C{i % 10}", label=f"eval {group_label(i)}") for i in range(len(groups))],
                       fontsize=7, loc="best")
        title += f"; evals differ in {', '.join(differing_keys(groups))}: compare perplexities within one colour only"
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def summarize(dirs: List[Path], out_dir: Optional[Path] = None) -> Optional[Path]:
    """Write summary.md and summary.png into `out_dir` (default: the first directory)."""
    dirs = [Path(d) for d in dirs]
    out_dir = Path(out_dir or dirs[0])
    jobs = collect_jobs(dirs)
    if not jobs:
        return None
    groups, _ = ranked(jobs)
    text = [f"# Sweep summary: {out_dir}", "", summary_table(jobs, out_dir), ""]
    if groups:
        text += best_lines(groups, out_dir, "Best", "evals", job_eval_settings, lambda j: f"perplexity {j['results']['perplexity']:.2f}", "eval ")
    scored = [j for g in groups for j in g if downstream_accuracy(j) is not None]
    if scored:
        by_task = [sorted(g, key=downstream_accuracy, reverse=True) for g in comparable_groups(scored, job_downstream_settings)]
        text += [""] + best_lines(by_task, out_dir, "Best downstream", "downstream evals", job_downstream_settings,
                                  lambda j: f"{_downstream_text(j)} (median of {len(j['results']['downstream'].get('seeds', []))} seeds)", "downstream eval ")
    text.append("\n![summary](summary.png)\n")
    budget = budget_sweep(jobs)
    if budget:
        if len(groups) > 1:
            text.append(f"The Pareto fronts below compare the jobs of eval A only ({len(budget)} job(s)): a front never mixes evals.\n")
        text += [front_tables(budget, out_dir), "![budget](budget.png)\n"]
    atomic_write_text(out_dir / "summary.md", "\n".join(text))
    plot_sweep(jobs, out_dir / "summary.png")
    if budget:
        plot_budget(budget, out_dir / "budget.png")
    return out_dir / "summary.md"


# ---------------------------------------------------------------- what each minute buys: quality against compute

BUDGET_KEYS = ("trainer.budget_minutes", "trainer.max_steps")  # a sweep over either gets budget.png and the Pareto tables
COMPUTE = (("train_tokens", "training tokens"), ("train_seconds", "training seconds"))


def budget_sweep(jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The succeeded jobs of a sweep that varies the training budget (with their compute measured), else []:
    those of the largest group of comparable evals (group A of the summary)."""
    if not set(BUDGET_KEYS) & set(swept_keys(jobs)):
        return []
    groups, _ = ranked(jobs)
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
    out = [("eval perplexity", lambda j: j["results"]["perplexity"], False)]
    groups = comparable_groups([j for j in jobs if downstream_accuracy(j) is not None], job_downstream_settings)
    if groups:  # the largest group of one downstream eval: a front never mixes tasks
        members = {id(j) for j in groups[0]}
        task = groups[0][0]["results"]["downstream"].get("task", "?")
        out.append((f"{task} accuracy (median of seeds)", lambda j: downstream_accuracy(j) if id(j) in members else None, True))
    return out


def front_tables(jobs: List[Dict[str, Any]], root: Path) -> str:
    """Markdown: per quality, the jobs on its Pareto front against training time, and what each extra minute bought."""
    text, swept = [], swept_keys(jobs)
    for label, value, higher in _qualities(jobs):
        scored = [j for j in jobs if value(j) is not None]
        front = [scored[i] for i in pareto_front([(j["results"]["train_seconds"], value(j)) for j in scored], higher)]
        text += [f"Pareto front, {label} against training time ({len(front)} of {len(scored)} jobs; no job does better in less time):", "",
                 "| job | swept | train s | train tokens | " + label + " | change per extra minute |", "|---|---|---:|---:|---:|---:|"]
        for before, j in zip([None] + front, front):
            r = j["results"]
            gain = "-" if before is None else f"{(value(j) - value(before)) / max((r['train_seconds'] - before['results']['train_seconds']) / 60, 1e-9):+.3g}"
            text.append(f"| {_job_name(j, root)} | {_swept_text(j, swept)} | {r['train_seconds']:.3g} | {int(r['train_tokens']):,} | "
                        f"{value(j):.{2 if not higher else 3}f} | {gain} |")
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
                ax.annotate(",".join(f"{k.split('.')[-1]}={j['overrides'].get(k)}" for k in keys), (x, y),
                            fontsize=7, xytext=(4, 4), textcoords="offset points")
            if xs and min(xs) > 0 and max(xs) / min(xs) >= 3:
                ax.set_xscale("log")
            ticks = sorted(set(xs))  # label the jobs' own values, compactly (24k, 1.2M)
            ax.set_xticks(ticks, [_compact(t) for t in ticks], rotation=30 if len(ticks) > 5 else 0)
            ax.minorticks_off()
            ax.margins(x=0.12, y=0.1)  # room for the labels of the outermost points
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(f"{label.split(' (')[0]} vs {xlabel}" + (" (higher is better)" if higher else " (lower is better)"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"what the training budget buys: {len(jobs)} job(s), swept {', '.join(keys)}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


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
        if key in eval_keys(base):
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
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
             if not o.is_sweep_override() and o.get_key_element() != group]
    values = [eval_settings(flat_settings(loader.load_sweep_config(config, fixed + [f"{group}={option}"])) or {}) for option in options]
    return [k for k in values[0] if len({json.dumps(v.get(k), default=str) for v in values}) > 1]


def check_search_space(config: DictConfig) -> None:
    """An Optuna study ranks its trials by eval perplexity: one whose search space varies the eval is refused
    in one line (UserError) before any trial runs. Other sweepers rank nothing; their summary groups the evals."""
    if "optuna" not in str(config.hydra.sweeper.get("_target_", "")).lower():
        return
    found = eval_sweeps(search_space(config), config)
    if found:
        raise UserError(f"hparams_search=optuna would rank trials scored on different evals: its search space varies {'; '.join(found)}; "
                        "give it one value for the study, or sweep it without Optuna (python run.py -m key=a,b), whose summary ranks each eval on its own")


class SweepSummaryCallback(Callback):
    """Hydra callback: refuse an Optuna search over eval settings when a multirun starts; summarise the sweep
    directory when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from mlm.distributed import is_main_process

        try:  # every rank decides alike (a torchrun around a study runs a sampler on each)
            check_search_space(config)
        except UserError as e:
            if is_main_process():
                print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config, **kwargs) -> None:
        from mlm.distributed import is_main_process

        if not is_main_process():
            return
        path = summarize([Path(config.hydra.sweep.dir)])
        if path:
            print(f"sweep summary: {path}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlm.report", description="Summarise runs and sweeps: summary.md + summary.png")
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first directory)")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)  # a new directory for a summary of several sweeps
    for job in collect_jobs(args.dirs):  # refresh each run's curves too
        plot_run(job["dir"])
    path = summarize(args.dirs, args.out)
    if path is None:
        print("no job directories (with results.json or error.txt) found", flush=True)
        return 1
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
