"""Run curves and sweep summaries.

- `plot_run(run_dir)`: curves.png beside metrics.jsonl (train loss, eval perplexity, lr).
- `python -m mlm.report <sweep or run dirs...>`: summary.md (one row per job, sorted by
  perplexity) and summary.png (perplexity against each swept value, and the curves).
  Hydra calls the same at the end of every multirun (SweepSummaryCallback in conf/config.yaml).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback

from mlm.files import atomic_path, atomic_write_text
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


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fmt(v, digits=2):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def summary_table(jobs: List[Dict[str, Any]], root: Path) -> str:
    def key(j):
        return (failure(j) is not None, j["results"]["perplexity"] if failure(j) is None else float("inf"))

    lines = [
        "| job | overrides | final ppl | best ppl | ppl before | tokens/s | train s | wall s | device | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for j in sorted(jobs, key=key):
        r = j["results"]
        name = str(j["dir"].relative_to(root)) if j["dir"] != root and root in j["dir"].parents else j["dir"].name
        status = "ok" if failure(j) is None else "failed: " + failure(j).replace("|", "/")[:80]
        lines.append(
            f"| {name} | {' '.join(f'{k}={v}' for k, v in j['overrides'].items()) or '-'} | {_fmt(r.get('perplexity'))} | "
            f"{_fmt(r.get('best_perplexity'))} | {_fmt(r.get('perplexity_before'))} | {_fmt(r.get('tokens_per_s'), 0)} | "
            f"{_fmt(r.get('train_seconds'), 0)} | {_fmt(r.get('wall_seconds'), 0)} | {_device(r)} | {status} |"
        )
    return "\n".join(lines)


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
    ok = [j for j in jobs if failure(j) is None]
    for ax, k in zip(axes, keys):
        values = [j["overrides"].get(k, "-") if k != "job" else j["dir"].name for j in ok]
        ppl = [j["results"]["perplexity"] for j in ok]
        numeric = all(_num(v) is not None for v in values)
        if numeric and values:
            x = [_num(v) for v in values]
            ax.scatter(x, ppl)
            if min(x) > 0 and max(x) / min(x) >= 3:
                ax.set_xscale("log")
            ticks = sorted(set(x))  # label exactly the swept values, compactly (2e-4, not 0.0002)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        else:
            cats = sorted(set(values))
            ax.scatter([cats.index(v) for v in values], ppl)
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
    fig.suptitle(f"{len(ok)} job(s)" + (f", {failed} failed" if failed else ""))
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
    best = min((j for j in jobs if failure(j) is None),
               key=lambda j: j["results"]["perplexity"], default=None)
    text = [f"# Sweep summary: {out_dir}", "", summary_table(jobs, out_dir), ""]
    if best:
        text.append(f"Best: `{' '.join(f'{k}={v}' for k, v in best['overrides'].items()) or best['dir'].name}` "
                    f"with perplexity {best['results']['perplexity']:.2f}.")
    text.append("\n![summary](summary.png)\n")
    atomic_write_text(out_dir / "summary.md", "\n".join(text))
    plot_sweep(jobs, out_dir / "summary.png")
    return out_dir / "summary.md"


class SweepSummaryCallback(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends."""

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
