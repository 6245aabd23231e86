"""Two CPU processes (torchrun, gloo) train exactly what one process trains with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RUN, run_cli, sentences

pytestmark = pytest.mark.slow

# global batch 8 = 4 per device x 2 processes x 1 micro-batch  |  4 per device x 1 process x 2 micro-batches
COMMON = [*TINY_RUN, "trainer.mixed_precision=no", "model.dropout=0", "trainer.per_device_batch_size=4",
          "trainer.max_steps=6", "trainer.eval_every=3", "trainer.log_every=1", "trainer.max_eval_blocks=37",
          "trainer.checkpoint_every=3"]
# fp32 sums in a different order (all-reduce of two halves vs accumulation) differ in the last bits;
# over 6 Adam steps that stays below 1e-5 relative, while a different mask or batch changes the
# loss by more than 1e-2.
RTOL = 1e-5


def curves(run_dir: Path):
    loss, evals = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            loss[r["step"]] = r["train/loss"]
        if "eval/perplexity" in r:
            evals[r["step"]] = r["eval/perplexity"]
    return loss, evals


def test_two_processes_match_one_process(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(500)))
    one = tmp_path / "one"
    proc = run_cli([*COMMON, "trainer.gradient_accumulation_steps=2", f"dataset.path={corpus}", f"hydra.run.dir={one}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    work = tmp_path / "two"
    work.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", str(ROOT / "run.py"),
           *COMMON, "trainer.gradient_accumulation_steps=1", f"dataset.path={corpus}"]
    proc = subprocess.run(cmd, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((work / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs  # both ranks agreed on one run directory
    two = runs[0]
    assert json.loads((two / "results.json").read_text())["processes"] == 2
    assert len(list(two.glob("*.log"))) == 1  # one log file, from the main process
    assert proc.stdout.count("perplexity:") == 1  # one summary, from the main process
    assert sorted(p.name for p in (two / "checkpoints" / "ckpt-00000006").glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]

    loss1, eval1 = curves(one)
    loss2, eval2 = curves(two)
    assert loss1.keys() == loss2.keys() == set(range(1, 7))
    for step in loss1:
        assert loss2[step] == pytest.approx(loss1[step], rel=RTOL), step
    assert eval1.keys() == eval2.keys() == {0, 3, 6}
    for step in eval1:
        assert eval2[step] == pytest.approx(eval1[step], rel=RTOL), step
    # the eval set (37 blocks, odd) was split 18/19 over the ranks: every masked token counted once
    m1 = [json.loads(l)["eval/masked_tokens"] for l in (one / "metrics.jsonl").read_text().splitlines() if "eval/masked_tokens" in l]
    m2 = [json.loads(l)["eval/masked_tokens"] for l in (two / "metrics.jsonl").read_text().splitlines() if "eval/masked_tokens" in l]
    assert m1 == m2
