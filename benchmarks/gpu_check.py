#!/usr/bin/env python
"""GPU acceptance check: the claims docs/ makes about GPUs (docs/performance.md, docs/distributed.md), measured on the machine at hand.

    python benchmarks/gpu_check.py [--budget-minutes 8] [--json out.json] [--md out.md] [--out-dir DIR]
    make gpu-check   (writes benchmarks/results/gpu_check.json and gpu_check.md: the table to paste into a note)

One table, one row per check: what was measured, and ok / FAIL / skipped: <reason>. Every run is
built by the harness's own code: `run.py` (or `torchrun run.py`) subprocesses, and for the sync
count mlm.overrides.compose + mlm.train.train in this process. Correctness rows use the tiny model
(model=tiny trainer=debug, block 32) on a generated text corpus; only the throughput rows run
the sized benchmark (benchmarks/train_throughput.py). Every row runs on one GPU except the last
two, which say they need two.

  auto precision        runtime.mixed_precision=auto: what it resolved to (results.json) against
                        what this device runs natively (mlm.precision.native_bf16)
  fp16 loss scale       runtime.mixed_precision=fp16: the last train/loss_scale in metrics.jsonl and
                        results.json's overflow_steps (CPU too: the harness attaches a GradScaler)
  syncs per step        CUDA: train() in this process under torch.cuda.set_sync_debug_mode("warn"),
                        2 and 12 steps; (warnings of the 12-step run - those of the 2-step run) / 10
                        is the steady-state count per step (start-up, the final eval and checkpoint
                        cancel out). docs/performance.md claims one (the loss/grad-norm read-back). Not every
                        synchronizing operation warns (torch's caveat: torch.distributed ops do not).
  throughput default 128, base 128, base 512
                        CUDA: benchmarks/train_throughput.py --quick --scale S --block B as a subprocess:
                        harness and harness_compile against trainer_bf16 and trainer_bf16_compile
                        (Trainer's bf16, fused AdamW, sdpa, torch_compile) on the GPU at the same
                        global batch; tokens/s, MFU against the datasheet peak, peak memory, eval
                        loss. Each gets an equal share of the budget left before it (less
                        AFTER_THROUGHPUT_S for the two-GPU rows where they run); its full table
                        goes into --md
  parallel jobs         run.py -m hydra/launcher=parallel hydra.launcher.n_jobs=2: the slots in
                        lease.jsonl (MLM_LEASE_DIR) never shared by two running jobs; on CUDA also
                        the device memory in use after the sweep against before (torch.cuda.mem_get_info)
  compile recompiles    CUDA: runtime.compile=true with TORCH_LOGS=recompiles; the recompiles logged
                        and whether torch._dynamo's recompile limit was hit (then it falls back to eager)
  DDP vs FSDP           2+ GPUs: torchrun --nproc_per_node 2 with runtime.sharding=none and fsdp, fp32,
                        dropout 0: the same perplexity (relative 1e-3, as the CPU test asks)
  failing rank (NCCL)   2+ GPUs: a 2-job sweep under torchrun --nproc_per_node 2 with MLM_TEST_FAIL=0:1:3
                        (job 0 fails on rank 1 after step 3): job 0 must fail on both ranks and job 1 run;
                        how long torchrun took to exit, or killed after PEER_WAIT_S (NCCL peers may
                        wait out the group's timeout, runtime.collective_timeout_minutes, default 10;
                        docs/resume-and-failures.md, "Failure propagation across ranks")

--budget-minutes bounds the whole script: each subprocess gets what is left, and rows that find the
budget spent say "skipped: budget". On a machine without CUDA the CUDA rows say "skipped: no CUDA
device" and the other three run on CPU (tests/test_gpu_check.py runs it so, so it cannot rot).
Never a CI dependency on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import emit  # noqa: E402  benchmarks/common.py (the script's folder is on sys.path)

TINY = ["model=tiny", "trainer=debug", "experiment=none", "dataset=local", "block_size=32", "trainer.save_model=false"]
STEPS = 4  # trainer=debug's max_steps
THROUGHPUT = {
    "throughput default 128": ("default", 128),
    "throughput base 128": ("base", 128),
    "throughput base 512": ("base", 512),
}
# the throughput rows after the quick single-GPU ones: they take what the budget has left
ROWS = (
    "auto precision",
    "fp16 loss scale",
    "syncs per step",
    "parallel jobs",
    "compile recompiles",
    *THROUGHPUT,
    "DDP vs FSDP",
    "failing rank (NCCL)",
)
CUDA_ONLY = {"syncs per step", "compile recompiles", *THROUGHPUT}
MULTI_GPU = {"DDP vs FSDP", "failing rank (NCCL)"}
PEER_WAIT_S = 180  # the failing-rank row waits this long at most: NCCL peers may otherwise wait out the group's timeout (runtime.collective_timeout_minutes, default 10)
MIN_ROW_S = 15  # a row is not started with less budget than this: no run.py finishes faster
AFTER_THROUGHPUT_S = 240  # kept from the throughput rows for the two-GPU rows after them, where there are 2+ GPUs
MIN_THROUGHPUT_S = 60  # a throughput row is not started with less: four workers start and compile


class Budget:
    def __init__(self, minutes: float):
        self.end = time.monotonic() + minutes * 60

    def left(self) -> float:
        return self.end - time.monotonic()


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    """Random sentences over a small vocabulary: enough blocks of 32 tokens for tens of steps."""
    words = (
        "the a of and to in is was for on that with as by at from it were which this "
        "star planet light water energy cell river city king war music language theory orbit moon"
    ).split()
    rng = random.Random(seed)
    path.write_text(
        "\n".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(8, 30))).capitalize() + "." for _ in range(lines)
        )
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env: dict, timeout: float, cwd: Path = ROOT):
    """(returncode or None when killed at the timeout, stdout, stderr, seconds). Its own session, so a
    timeout kills torchrun's workers too, not only the launcher."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    return rc, out, err, time.monotonic() - start


def run_py(args, env: dict, timeout: float, torchrun: int = 0):
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(torchrun),
            "--master_port",
            str(free_port()),
        ]
        if torchrun
        else [sys.executable]
    )
    return run([*launcher, str(ROOT / "run.py"), *args], env, timeout)


def run_tiny(ctx, name: str, *overrides: str, env: dict | None = None, torchrun: int = 0):
    """run.py on the tiny setup with `overrides`, into work/<name>: (run_dir, stderr, seconds, failure),
    where failure is None when it exited 0, else what `failed` says."""
    run_dir = ctx["work"] / name
    rc, _, err, s = run_py(
        [*ctx["tiny"], *overrides, f"hydra.run.dir={run_dir}"],
        {**ctx["env"], **(env or {})},
        ctx["budget"].left(),
        torchrun,
    )
    return run_dir, err, s, None if rc == 0 else failed(rc, err, s)


def failed(rc, err: str, seconds: float) -> str:
    if rc is None:
        return f"timed out after {seconds:.0f} s"
    last = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["(no stderr)"]
    return f"exit {rc}: {last[0][:160]}"


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def last_metric(run_dir: Path, key: str):
    """(step, value) of the last metrics.jsonl record that has `key`."""
    found = (None, None)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            found = (record["step"], record[key])
    return found


# ---------------------------------------------------------------- the checks (each returns result, status)


def check_auto_precision(ctx) -> tuple:
    from mlm.precision import native_bf16

    run_dir, _, _, failure = run_tiny(ctx, "auto", "runtime.mixed_precision=auto")
    if failure:
        return failure, "FAIL"
    r = results(run_dir)
    expected = "bf16" if native_bf16(ctx["device_type"]) else "no"
    result = (
        f"mixed_precision={r['mixed_precision']} (native bf16 here: {expected == 'bf16'}), device={r['device']}, "
        f"steps={r['steps']}, {r['tokens_per_s']:.0f} tokens/s, mfu "
        + (f"{r['mfu']:.3f}" if r.get("mfu") else "unknown (no peak for this device)")
    )
    return result, "ok" if r["mixed_precision"] == expected and r["steps"] == STEPS else "FAIL"


def check_fp16(ctx) -> tuple:
    run_dir, _, _, failure = run_tiny(ctx, "fp16", "runtime.mixed_precision=fp16")
    if failure:
        return failure, "FAIL"
    r = results(run_dir)
    step, scale = last_metric(run_dir, "train/loss_scale")
    result = (
        f"mixed_precision={r['mixed_precision']}, device={r['device']}, loss_scale={scale} at step {step}, "
        f"overflow_steps={r['overflow_steps']}, steps={r['steps']}"
    )
    ok = (
        r["mixed_precision"] == "fp16"
        and scale is not None
        and math.isfinite(scale)
        and scale >= 1
        and r["steps"] == STEPS
    )
    return result, "ok" if ok else "FAIL"


def check_syncs(ctx) -> tuple:
    from mlm.overrides import compose
    from mlm.train import train

    def syncs_in_run(steps: int) -> Counter:
        """Code location -> synchronizing CUDA operations seen there during one train() call."""
        # log_every past the end: the per-log grad-norm read (a sync by design) happens only at the
        # last step, in both runs alike; eval_every=0 is once per epoch, beyond 12 steps here
        cfg = compose([*ctx["tiny"], f"trainer.max_steps={steps}", "trainer.log_every=1000", "trainer.eval_every=0"])
        run_dir = ctx["work"] / f"syncs-{steps}"
        run_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every occurrence, not once per code location
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, run_dir)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # torch's message: "called a synchronizing CUDA operation"
        return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))

    short, long = syncs_in_run(2), syncs_in_run(12)
    per_step = (sum(long.values()) - sum(short.values())) / 10
    where = ", ".join(f"{loc} +{n}" for loc, n in (long - short).most_common(3)) or "none"
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved() / 2**20
    result = (
        f"{per_step:g} syncs/step over steps 3-12 ({sum(short.values())} in the 2-step run, {sum(long.values())} in the "
        f"12-step one; the 10 extra steps' from: {where}); memory_reserved after train() returned: {reserved:.0f} MiB"
    )
    return result, "ok" if per_step <= 1 else "FAIL"


def check_throughput(ctx, row: str) -> tuple:
    """One scale and block of benchmarks/train_throughput.py on this GPU (an equal share of the budget left)."""
    scale, block = THROUGHPUT[row]
    left = list(THROUGHPUT)[list(THROUGHPUT).index(row) :]  # this row and the throughput rows after it
    timeout = (ctx["budget"].left() - (AFTER_THROUGHPUT_S if ctx["gpus"] >= 2 else 0)) / len(left)
    if timeout < MIN_THROUGHPUT_S:
        return "skipped: budget", None
    out = ctx["work"] / f"train_throughput-{scale}-{block}.json"
    script = ROOT / "benchmarks" / "train_throughput.py"
    rc, stdout, err, s = run(
        [sys.executable, str(script), "--quick", "--scale", scale, "--block", str(block), "--json", str(out)],
        ctx["env"],
        timeout,
    )
    if rc is None or not out.exists():
        return failed(rc, err, s), "FAIL"
    r = json.loads(out.read_text())
    ctx.setdefault("throughput", {})[row] = {
        "json": r,
        "table": [line for line in stdout.splitlines() if not line.startswith("wrote ")],
    }
    return throughput_result(r, s), "ok" if rc == 0 and r["best_vs_best_trainer"]["speedup"] else "FAIL"


def throughput_result(r: dict, seconds: float) -> str:
    """The row's text: each variant's tokens/s, MFU and peak memory, the best-against-best ratio, the eval losses."""

    def cell(v):
        tps, mfu, mem = r["tokens_per_s"].get(v), r["mfu"].get(v), r["peak_memory_mb"].get(v)
        if tps is None:
            return f"{v} failed"
        return (
            f"{v} {tps:,.0f} tok/s"
            + (f" MFU {mfu:.1%}" if mfu is not None else "")
            + (f" {mem / 1024:.1f} GiB" if mem else "")
        )

    best, ev = r["best_vs_best_trainer"], r["eval_loss"]
    speedup = f"{best['speedup']:.2f}x" if best["speedup"] else "-"
    return (
        ", ".join(cell(v) for v in r["tokens_per_s"])
        + f"; best harness ({best['harness']}) vs best Trainer ({best['trainer']}): "
        f"{speedup}; eval loss after {ev['after_steps']} steps: harness {ev['harness'] or float('nan'):.3f}, "
        f"{ev['reference']} {ev.get(ev['reference']) or float('nan'):.3f} ({seconds:.0f} s)"
    )


def check_parallel(ctx) -> tuple:
    sweep, leases = ctx["work"] / "parallel", ctx["work"] / "leases"
    slots = [] if ctx["cuda"] else ["runtime.device_slots=2", "runtime.num_threads=1"]  # on CUDA the slots are the GPUs
    used_before = used_mib() if ctx["cuda"] else None
    rc, _, err, s = run_py(
        [
            "-m",
            *ctx["tiny"],
            "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=2",
            *slots,
            "optimizer.lr=1e-4,2e-4",
            f"hydra.sweep.dir={sweep}",
        ],
        {**ctx["env"], "MLM_LEASE_DIR": str(leases)},
        ctx["budget"].left(),
    )
    if rc != 0:
        return failed(rc, err, s), "FAIL"
    jobs = [sweep / str(i) for i in range(2)]
    done = [results(j) for j in jobs if (j / "results.json").exists()]
    records = [json.loads(line) for line in (leases / "lease.jsonl").read_text().splitlines()]
    mine = [r for r in records if r["owner"] in {str(j) for j in jobs}]
    overlapping = [
        (a, b)
        for i, a in enumerate(mine)
        for b in mine[i + 1 :]
        if a["acquired"] < b["released"] and b["acquired"] < a["released"]
    ]
    shared = [a for a, b in overlapping if a["slot"] == b["slot"]]
    result = (
        f"{len(done)}/2 jobs finished on {sorted({r['device'] for r in done})}, lease slots {sorted(r['name'] for r in mine)}, "
        f"ran at the same time: {'yes' if overlapping else 'no'}, a slot held by two running jobs: {'yes' if shared else 'no'}"
    )
    ok = len(done) == 2 and len(mine) == 2 and not shared
    if ctx["cuda"]:
        left = used_mib() - used_before
        result += f"; device memory in use after the sweep: {left:+.0f} MiB against before"
        ok = ok and left < 256  # the jobs' processes have exited: their memory must be back
    else:
        result += "; device memory: no CUDA device"
    return result, "ok" if ok else "FAIL"


def used_mib() -> float:
    free, total = torch.cuda.mem_get_info()  # the whole device, every process on it
    return (total - free) / 2**20


def check_compile(ctx) -> tuple:
    run_dir, err, s, failure = run_tiny(ctx, "compile", "runtime.compile=true", env={"TORCH_LOGS": "recompiles"})
    if failure:
        return failure, "FAIL"
    recompiles = err.count("Recompiling function")
    limit_hit = (
        "hit config." in err
    )  # torch._dynamo's warning when a frame exceeds its recompile limit (eager from then on)
    r = results(run_dir)
    result = (
        f"{recompiles} recompiles in {r['steps']} steps with evals every 2 (recompile limit "
        f"{torch._dynamo.config.recompile_limit}: {'hit' if limit_hit else 'not hit'}), {r['tokens_per_s']:.0f} tokens/s, {s:.0f} s"
    )
    return result, "ok" if not limit_hit else "FAIL"


def check_ddp_fsdp(ctx) -> tuple:
    ppl = {}
    for sharding in ("none", "fsdp"):
        run_dir, _, _, failure = run_tiny(
            ctx,
            f"shard-{sharding}",
            "model.dropout=0",
            "runtime.mixed_precision=no",
            f"runtime.sharding={sharding}",
            torchrun=2,
        )
        if failure:
            return f"sharding={sharding}: {failure}", "FAIL"
        r = results(run_dir)
        ppl[sharding] = (r["perplexity"], r["processes"], r["tokens_per_s"])
    rel = abs(ppl["fsdp"][0] - ppl["none"][0]) / ppl["none"][0]
    result = (
        "; ".join(f"{k}: perplexity {p:.4f}, {n} processes, {t:.0f} tokens/s" for k, (p, n, t) in ppl.items())
        + f"; relative difference {rel:.1e}"
    )
    return result, "ok" if rel <= 1e-3 and ppl["fsdp"][1] == ppl["none"][1] == 2 else "FAIL"


def check_failing_rank(ctx) -> tuple:
    # a sweep of two jobs under one torchrun: job 0 fails on rank 1 after step 3, job 1 must still run on both ranks
    sweep = ctx["work"] / "failing-rank"
    rc, _, err, s = run_py(
        ["-m", *ctx["tiny"], "trainer.max_steps=8", "optimizer.lr=1e-4,2e-4", f"hydra.sweep.dir={sweep}"],
        {**ctx["env"], "MLM_TEST_FAIL": "0:1:3"},
        min(ctx["budget"].left(), PEER_WAIT_S),
        torchrun=2,
    )
    error_file, second = sweep / "0" / "error.txt", sweep / "1" / "results.json"
    error = error_file.read_text().splitlines()[0] if error_file.exists() else "no error.txt"
    processes = json.loads(second.read_text())["processes"] if second.exists() else None
    result = f"job 0: rank 1 failed after step 3, error.txt: {error[:100]}; job 1: " + (
        f"finished on {processes} processes" if processes else "did not finish"
    )
    if rc is None:
        return f"{result}; processes still running after {s:.0f} s (killed)", "FAIL"
    # exit 1: a multirun with a failed job says so in its exit status, after job 1 ran
    return f"{result}; torchrun exited {rc} after {s:.0f} s", "ok" if rc == 1 and error.startswith(
        "rank 1:"
    ) and processes == 2 else "FAIL"


CHECKS = {
    "auto precision": check_auto_precision,
    "fp16 loss scale": check_fp16,
    "syncs per step": check_syncs,
    "parallel jobs": check_parallel,
    "compile recompiles": check_compile,
    **{row: (lambda ctx, row=row: check_throughput(ctx, row)) for row in THROUGHPUT},
    "DDP vs FSDP": check_ddp_fsdp,
    "failing rank (NCCL)": check_failing_rank,
}
assert tuple(CHECKS) == ROWS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=8.0,
        help="for the whole script; rows left when it is spent say 'skipped: budget'",
    )
    p.add_argument("--json", help="also write the rows here")
    p.add_argument(
        "--md",
        help="also write the table (and each throughput row's full table) here, as markdown to paste into a note",
    )
    p.add_argument("--out-dir", help="keep the runs here (default: a temporary directory, removed at the end)")
    p.add_argument(
        "--only",
        help="run only the rows whose name contains this (e.g. 'throughput' for a rerun of those); the others say 'skipped: --only'",
    )
    a = p.parse_args(argv)

    start = time.monotonic()
    budget = Budget(a.budget_minutes)
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    keep = tempfile.TemporaryDirectory(prefix="gpu-check-") if not a.out_dir else None
    work = Path(a.out_dir or keep.name).absolute()
    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "corpus.txt")
    # block cache, leases and thread count of this check alone; the in-process row reads os.environ
    os.environ["MLM_CACHE"] = str(work / "cache")
    env = {
        **os.environ,
        "HYDRA_FULL_ERROR": "0",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "MLM_LEASE_DIR": str(work / "leases"),
    }
    ctx = {
        "work": work,
        "env": env,
        "budget": budget,
        "cuda": cuda,
        "gpus": gpus,
        "device_type": "cuda" if cuda else "cpu",
        "tiny": [*TINY, f"dataset.path={corpus}"],
    }

    rows = []
    for name, check in CHECKS.items():
        if a.only and a.only not in name:
            result, status = "", "skipped: --only"
        elif name in CUDA_ONLY | MULTI_GPU and not cuda:
            result, status = "", "skipped: no CUDA device"
        elif name in MULTI_GPU and gpus < 2:
            result, status = "", f"skipped: needs 2+ CUDA devices (found {gpus})"
        elif budget.left() < MIN_ROW_S:
            result, status = "", "skipped: budget"
        else:
            t0 = time.monotonic()
            try:
                result, status = check(ctx)
            except Exception as e:  # a broken check is a failed row, not a lost table
                result, status = f"{type(e).__name__}: {str(e)[:200]}", "FAIL"
            if status is None:  # the check found it cannot run here; its result says why
                result, status = "", result
            print(f"[{name}] {status} ({time.monotonic() - t0:.0f} s) {result}", file=sys.stderr, flush=True)
        rows.append({"check": name, "result": result, "status": status})

    lines = ["| check | result | status |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['result'].replace('|', '/')} | {r['status']} |" for r in rows]
    device = torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA device)"
    command = (
        shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["benchmarks/gpu_check.py", *argv])
    )
    wall = time.monotonic() - start
    lines += [
        "",
        f"device: {device}, {gpus} CUDA device(s), torch {torch.__version__}; {wall:.0f} s of a {a.budget_minutes:g}-minute budget",
        f"command: {command}",
    ]
    out = {
        "rows": rows,
        "device": device,
        "cuda_devices": gpus,
        "torch": torch.__version__,
        "wall_s": wall,
        "budget_minutes": a.budget_minutes,
        "command": command,
    }
    out["throughput"] = {row: t["json"] for row, t in ctx.get("throughput", {}).items()}
    emit(lines, out, a.json)
    if a.md:
        write_markdown(Path(a.md), lines, ctx.get("throughput", {}))
    if keep is not None:
        keep.cleanup()
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


def write_markdown(path: Path, lines, throughput: dict) -> None:
    """The table, then each throughput row's own table in a code block."""
    text = ["# GPU check", "", *lines]
    for row, t in throughput.items():
        text += ["", f"## {row}", "", "```", *t["table"], "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
