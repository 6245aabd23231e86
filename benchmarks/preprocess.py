#!/usr/bin/env python
"""Preprocessing a corpus at 1x, 4x, 8x and 16x: wall time, tokens/s, peak memory; and streaming.

    python benchmarks/preprocess.py --json benchmarks/results/preprocess.json [--lines 65000 --scales 1 4 8 16]

Corpus: a generated text file of `--lines` lines (1x; ~100 WordPiece tokens a line, words drawn
from the tokenizer's whole-word vocabulary with Zipf frequencies, seed 0); the Nx file is the 1x
lines written N times (each line is tokenized again: the tokenizer keeps no cache).

For each size, two runs of the command below, each in a fresh process under /usr/bin/time
(wall seconds and peak RSS, `%M`: the largest resident set of the process or of any child):
  cold       run.py model=tiny trainer=debug dataset=local dataset.path=<file>, empty MLM_CACHE:
             preprocessing + a 4-step debug run. The preprocessing seconds are build_blocks' own
             (its "preprocessed N tokens in S s" log line), so start-up and the debug run are
             not in the tokens/s;
  streaming  the same with dataset.streaming=true (no preprocessing; the first 1000 documents are
             the eval set), and its time to the first training step (when metrics.jsonl gets
             its first training record).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import emit  # noqa: E402


def make_corpus(lines: int) -> str:
    from mlm.config import ModelConfig
    from mlm.models import load_tokenizer

    vocab = sorted(w for w in load_tokenizer(ModelConfig()).get_vocab() if w.isalpha() and w.isascii() and len(w) > 1)
    rng = np.random.default_rng(0)
    words = np.array(vocab)[np.minimum(rng.zipf(1.3, size=lines * 100), len(vocab)) - 1]
    lengths = rng.integers(60, 140, size=lines)
    text, start = [], 0
    for n in lengths:
        text.append(" ".join(words[start % len(words) : start % len(words) + n]).capitalize() + ".")
        start += n
    return "\n".join(text) + "\n"


def timed(args, env, watch: Path | None = None) -> dict:
    """Wall seconds and peak RSS of `python run.py args` in a fresh process (GNU time's %e and %M);
    with `watch` (a metrics.jsonl), also the seconds until its first training record appears."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out, tempfile.TemporaryFile("w+") as err:
        cmd = ["/usr/bin/time", "-f", "%e %M", "-o", out.name, sys.executable, str(ROOT / "run.py"), *args]
        start, first = time.perf_counter(), None
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=err, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if watch is not None and first is None and watch.exists() and '"train/loss"' in watch.read_text():
                first = time.perf_counter() - start
            time.sleep(0.1)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"failed: {shlex.join(cmd)}\n{err.read()[-3000:]}")
        wall, rss_kb = out.read().split()[-2:]
        err.seek(0)
        built = re.search(r"preprocessed (\d+) tokens in ([\d.]+) s", err.read())
    result = {"wall_s": float(wall), "peak_rss_mb": int(rss_kb) / 1024}
    if built:  # build_blocks' own timing: the preprocessing part of the wall time
        result["tokens"], result["preprocess_s"] = int(built[1]), float(built[2])
    if watch is not None:
        result["first_step_s"] = first
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=65000)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--num-proc", type=int, default=0, help="dataset.num_proc (0 = every core)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="mlm-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    base = [
        "model=tiny",
        "trainer=debug",
        "dataset=local",
        f"dataset.num_proc={a.num_proc}",
        "trainer.save_model=false",
    ]
    results = {}
    text = make_corpus(a.lines)
    for scale in a.scales:
        corpus = work / f"corpus-{scale}x.txt"
        corpus.write_text(text * scale)
        cache = work / f"cache-{scale}x"
        shutil.rmtree(cache, ignore_errors=True)
        env = {"MLM_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
        args = [*base, f"dataset.path={corpus}"]
        r = {"lines": a.lines * scale, "file_mb": corpus.stat().st_size / 2**20}
        for run in ("cold", "stream"):  # no stale metrics.jsonl from an earlier invocation
            shutil.rmtree(work / f"{run}-{scale}", ignore_errors=True)
        r["cold"] = timed([*args, f"hydra.run.dir={work / f'cold-{scale}'}"], env)
        r["tokens"], r["preprocess_s"] = r["cold"].pop("tokens"), r["cold"].pop("preprocess_s")
        r["tokens_per_s"] = r["tokens"] / r["preprocess_s"]
        r["startup_and_debug_run_s"] = r["cold"]["wall_s"] - r["preprocess_s"]
        run_dir = work / f"stream-{scale}"
        r["streaming"] = timed(
            [*args, "dataset.streaming=true", f"hydra.run.dir={run_dir}"], env, watch=run_dir / "metrics.jsonl"
        )
        results[f"{scale}x"] = r
        print(f"{scale}x: {json.dumps(r)}", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        corpus.unlink()

    one = results[f"{a.scales[0]}x"]
    lines = [
        f"{'size':>5} {'tokens':>12} {'run s':>8} {'prep s':>7} {'tok/s':>10} {'RSS MB':>7} "
        f"{'stream s':>8} {'1st step s':>10} {'stream RSS':>10}"
    ]
    for k, r in results.items():
        lines.append(
            f"{k:>5} {r['tokens']:>12,} {r['cold']['wall_s']:>8.1f} {r['preprocess_s']:>7.1f} "
            f"{r['tokens_per_s']:>10,.0f} {r['cold']['peak_rss_mb']:>7.0f} {r['streaming']['wall_s']:>8.1f} "
            f"{r['streaming']['first_step_s']:>10.1f} {r['streaming']['peak_rss_mb']:>10.0f}"
        )
    ratios = {
        k: {
            "tokens": r["tokens"] / one["tokens"],
            "preprocess_time": r["preprocess_s"] / one["preprocess_s"],
            "peak_rss": r["cold"]["peak_rss_mb"] / one["cold"]["peak_rss_mb"],
            "streaming_wall_over_preprocess": r["streaming"]["wall_s"] / r["preprocess_s"],
            "streaming_rss_over_1x_rss": r["streaming"]["peak_rss_mb"] / one["cold"]["peak_rss_mb"],
        }
        for k, r in results.items()
    }
    for k, q in ratios.items():
        lines.append(
            f"{k}: {q['tokens']:.2f}x tokens -> {q['preprocess_time']:.2f}x preprocessing time, {q['peak_rss']:.2f}x peak RSS; "
            f"streaming run {q['streaming_wall_over_preprocess']:.0%} of the preprocessing time, RSS {q['streaming_rss_over_1x_rss']:.2f}x the 1x run"
        )
    command = shlex.join(["python", "benchmarks/preprocess.py", *(sys.argv[1:] if argv is None else argv)])
    lines.append(f"command: {command}")
    out = {
        "results": results,
        "ratios_to_first_scale": ratios,
        "command": command,
        "cpus": os.cpu_count(),
        "settings": {"lines_1x": a.lines, "num_proc": a.num_proc, "run": base},
    }
    emit(lines, out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
