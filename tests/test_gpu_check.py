"""benchmarks/gpu_check.py runs here on CPU: every row present, the CUDA rows skipped, the CPU rows ok
with the values the runs wrote. (On a GPU it is run by hand; never a CI dependency on one.)"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CPU_ROWS = ("auto precision", "fp16 loss scale", "parallel jobs")
CUDA_ROWS = (
    "syncs per step",
    "throughput default 128",
    "throughput base 128",
    "throughput base 512",
    "compile recompiles",
    "DDP vs FSDP",
    "failing rank (NCCL)",
)


def table(stdout: str) -> dict:
    """check -> (result, status) from the printed markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] not in ("check", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def value(result: str, key: str) -> str:
    match = re.search(rf"{re.escape(key)}=([^,;\s]+)", result)
    assert match, f"{key}= not in {result!r}"
    return match.group(1)


@pytest.mark.slow
def test_gpu_check_on_cpu_runs_the_cpu_rows_and_skips_the_cuda_ones_and_its_two_process_rows_run_on_gloo(tmp_path):
    """The script as run: every row present, the CUDA rows skipped, the CPU rows ok with the values the runs wrote.
    Meanwhile (its runs and these are tiny, one thread each: on two cores neither waits long for the other) the 2-GPU
    rows' torchrun commands and their reading of the runs, on 2 CPU processes (gloo): there a failing rank ends its job
    on both ranks at once (NCCL is what the GPU row is for)."""
    if torch.cuda.is_available():  # on a GPU the script is run by hand (it runs its CUDA rows); the 2-process rows here
        two_process_rows(tmp_path / "rows")
        return
    out = tmp_path / "check.json"
    script = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--budget-minutes", "6", "--json", str(out), "--out-dir", str(tmp_path / "work")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        two_process_rows(tmp_path / "rows")
        stdout, stderr = script.communicate(timeout=900)
    finally:
        if script.poll() is None:  # a failure above: the script ends, and the runs it started (each in its own session)
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(script.pid).suspend()  # it starts no more
                for run in psutil.Process(script.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        run.kill()
            script.kill()
        script.wait()
    assert script.returncode == 0, stdout[-3000:] + stderr[-3000:]
    rows = table(stdout)
    module = load_script()
    assert tuple(rows) == module.ROWS and set(rows) == set(CPU_ROWS + CUDA_ROWS)
    assert [r["check"] for r in json.loads(out.read_text())["rows"]] == list(rows)
    for name in CUDA_ROWS:
        assert rows[name] == ("", "skipped: no CUDA device")
    for name in CPU_ROWS:
        assert rows[name][1] == "ok", rows[name]

    # the values in the table are the ones the runs wrote
    work = tmp_path / "work"
    auto = json.loads((work / "auto" / "results.json").read_text())
    result = rows["auto precision"][0]
    assert value(result, "mixed_precision") == auto["mixed_precision"] in ("bf16", "no")
    assert value(result, "device") == "cpu" and int(value(result, "steps")) == auto["steps"] == 4

    fp16 = json.loads((work / "fp16" / "results.json").read_text())
    scales = [
        json.loads(line)["train/loss_scale"]
        for line in (work / "fp16" / "metrics.jsonl").read_text().splitlines()
        if "train/loss_scale" in line
    ]
    result = rows["fp16 loss scale"][0]
    assert value(result, "mixed_precision") == fp16["mixed_precision"] == "fp16"
    assert float(value(result, "loss_scale")) == scales[-1] >= 1
    assert int(value(result, "overflow_steps")) == fp16["overflow_steps"]

    result = rows["parallel jobs"][0]
    leases = [json.loads(line) for line in (work / "leases" / "lease.jsonl").read_text().splitlines()]
    assert sorted(r["owner"] for r in leases) == [str(work / "parallel" / str(i)) for i in range(2)]
    assert "2/2 jobs finished on ['cpu']" in result and "a slot held by two running jobs: no" in result
    assert all(r["name"] in result for r in leases)


def two_process_rows(tmp_path: Path) -> None:
    """check_ddp_fsdp and check_failing_rank on 2 CPU processes, with what they read checked."""
    module = load_script()
    tmp_path.mkdir()
    corpus = module.write_corpus(tmp_path / "corpus.txt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    ctx = {"work": tmp_path, "env": env, "budget": module.Budget(10), "tiny": [*module.TINY, f"dataset.path={corpus}"]}

    result, status = module.check_ddp_fsdp(ctx)
    assert status == "ok", result
    for sharding in ("none", "fsdp"):
        r = json.loads((tmp_path / f"shard-{sharding}" / "results.json").read_text())
        assert (
            r["processes"] == 2
            and r["sharding"] == sharding
            and f"{sharding}: perplexity {r['perplexity']:.4f}" in result
        )

    result, status = module.check_failing_rank(ctx)
    assert status == "ok", result
    assert "job 0: rank 1 failed after step 3, error.txt: rank 1: RuntimeError: injected failure" in result
    assert (
        "job 1: finished on 2 processes" in result and "torchrun exited 1 after" in result
    )  # the sweep says a job failed


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))  # its `from common import emit`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.mark.slow
def test_the_sync_row_trains_in_process_through_compose_and_train(tmp_path, monkeypatch):
    """The CUDA-only sync row's plumbing (mlm.overrides.compose + mlm.train.train, two runs, the count) on CPU,
    with the CUDA calls stubbed: no warnings here, so 0 per step. Keeps the row from rotting unseen."""
    module = load_script()
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    corpus = module.write_corpus(tmp_path / "corpus.txt")
    ctx = {"work": tmp_path, "tiny": [*module.TINY, f"dataset.path={corpus}"]}
    result, status = module.check_syncs(ctx)
    assert modes == ["warn", "default"] * 2
    assert status == "ok" and result.startswith("0 syncs/step")
    assert [json.loads((tmp_path / f"syncs-{n}" / "results.json").read_text())["steps"] for n in (2, 12)] == [2, 12]


def test_a_spent_budget_skips_the_rows_left_and_the_table_is_still_whole(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--budget-minutes", "0", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table(proc.stdout)
    assert set(rows) == set(CPU_ROWS + CUDA_ROWS)
    for name in CPU_ROWS:  # the rows that run everywhere
        assert rows[name] == ("", "skipped: budget")


def test_the_throughput_rows_run_the_benchmark_at_their_scale_in_a_share_of_the_budget(tmp_path, monkeypatch):
    """The CUDA-only throughput rows' plumbing on CPU, with the subprocess stubbed: each row runs
    train_throughput.py at its scale and block within an equal share of what the budget has left (less what
    the rows after them keep), and reads the row from the JSON it wrote; with too little left it says budget."""
    module = load_script()
    calls = []

    def fake_run(cmd, env, timeout):
        calls.append((cmd, timeout))
        out = json.dumps(
            {
                "tokens_per_s": {"trainer_bf16": 1000.0, "harness": 2500.0},
                "mfu": {"trainer_bf16": 0.1, "harness": 0.3},
                "peak_memory_mb": {"trainer_bf16": 2048.0, "harness": 1024.0},
                "best_vs_best_trainer": {"harness": "harness", "trainer": "trainer_bf16", "speedup": 2.5},
                "eval_loss": {"after_steps": 13, "harness": 7.0, "reference": "trainer_bf16", "trainer_bf16": 7.1},
            }
        )
        (tmp_path / cmd[cmd.index("--json") + 1]).write_text(out)
        return 0, "table line\nwrote x", "", 42.0

    monkeypatch.setattr(module, "run", fake_run)
    ctx = {"work": tmp_path, "env": {}, "budget": module.Budget(10), "gpus": 1}
    result, status = module.check_throughput(ctx, "throughput base 512")
    ((cmd, timeout),) = calls
    assert cmd[cmd.index("--scale") + 1] == "base" and cmd[cmd.index("--block") + 1] == "512" and "--quick" in cmd
    assert 595 < timeout <= 600  # the last throughput row on one GPU: all that is left
    assert status == "ok" and result.startswith(
        "trainer_bf16 1,000 tok/s MFU 10.0% 2.0 GiB, harness 2,500 tok/s MFU 30.0% 1.0 GiB"
    )
    assert "best harness (harness) vs best Trainer (trainer_bf16): 2.50x" in result
    assert ctx["throughput"]["throughput base 512"]["table"] == ["table line"]

    ctx["gpus"] = 2  # the two-GPU rows after them keep their share
    module.check_throughput(ctx, "throughput default 128")  # the first of three: a third
    assert calls[-1][1] == pytest.approx((600 - module.AFTER_THROUGHPUT_S) / 3, abs=5)
    ctx["budget"] = module.Budget((module.AFTER_THROUGHPUT_S + module.MIN_THROUGHPUT_S - 5) / 60)
    assert module.check_throughput(ctx, "throughput base 512") == ("skipped: budget", None)


def test_only_runs_the_rows_named_and_the_table_says_so(tmp_path, monkeypatch, capsys):
    module = load_script()
    monkeypatch.setenv("MLM_CACHE", str(tmp_path / "cache"))  # main() points it at its work dir; restored after
    md = tmp_path / "check.md"
    assert (
        module.main(
            ["--budget-minutes", "0", "--only", "parallel", "--out-dir", str(tmp_path / "work"), "--md", str(md)]
        )
        == 0
    )
    rows = table(capsys.readouterr().out)
    assert rows["parallel jobs"] == ("", "skipped: budget")  # the row named, out of budget here
    assert all(status == "skipped: --only" for name, (_, status) in rows.items() if name != "parallel jobs")
    assert md.read_text().startswith("# GPU check\n\n| check | result | status |")
