"""Launchers (docs/launchers.md): the W&B sweep file run through wandb's own agent code by the local stand-in
(launchers/wandb_local_agent.py), and the SkyPilot task files' `run` scripts (the per-GPU agents script,
slurm/wandb_agents.sbatch, is tested in test_slurm_script.py). Not run here: the W&B server, a SLURM cluster, a cloud,
GPUs. SkyPilot's own parser runs only where MLM_SKYPILOT_PYTHON names a Python that has SkyPilot (the suite does not
install it)."""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launchers import wandb_local_agent as agent
from tests.conftest import ROOT, TINY_RUN, sentences
from tests.test_slurm_script import fake_wandb

SWEEP_FILE = ROOT / "sweeps" / "wandb.yaml"
SKYPILOT = ROOT / "launchers" / "skypilot"
TRIAL_DIR = "hydra.run.dir=outputs/sweeps/${oc.env:WANDB_SWEEP_ID}/${oc.env:WANDB_RUN_ID}"


def test_the_shipped_sweep_file_reads_as_wandb_reads_it():
    """`wandb sweep` reads the file with PyYAML (YAML 1.1), where 1e-4 is a string: every bound must be a number."""
    sweep = agent.read_sweep_file(SWEEP_FILE)
    for name, spec in sweep["parameters"].items():
        for key in ("min", "max"):
            assert isinstance(spec.get(key, 0), (int, float)), (name, key, spec[key])
    command = sweep["command"]
    assert command[:3] == ["${env}", "python", "${program}"] and command[-1] == "${args_no_hyphens}"
    assert TRIAL_DIR in command  # one directory per trial, named by the ids the agent sets
    with pytest.raises(SystemExit, match="bound '1e-4' is not a number"):
        agent.sample_value("optimizer.lr", {"distribution": "log_uniform_values", "min": "1e-4", "max": 3e-3}, random)


def test_grid_takes_the_combinations_in_order_random_samples_each_parameter_in_its_range():
    grid = {"method": "grid", "parameters": {"a": {"values": [1, 2]}, "b": {"values": ["x", "y"]}, "c": {"value": 0}}}
    assert agent.trial_values(grid, 3, random.Random(0)) == [
        {"a": 1, "b": "x", "c": 0},
        {"a": 1, "b": "y", "c": 0},
        {"a": 2, "b": "x", "c": 0},
    ]
    sweep = agent.read_sweep_file(SWEEP_FILE)  # bayes: sampled at random by the stand-in
    trials = agent.trial_values(sweep, 50, random.Random(1))
    assert trials == agent.trial_values(sweep, 50, random.Random(1))  # the seed decides
    lr = sweep["parameters"]["optimizer.lr"]
    assert all(lr["min"] <= t["optimizer.lr"] <= lr["max"] for t in trials)
    assert len({t["optimizer.lr"] for t in trials}) == 50
    for name in ("scheduler.warmup_ratio", "masking.train_probability"):
        assert {t[name] for t in trials} == set(sweep["parameters"][name]["values"])
    grid["parameters"]["d"] = {"min": 0.0, "max": 1.0}
    with pytest.raises(SystemExit, match="needs `values` for every parameter; d has a distribution"):
        agent.trial_values(grid, 1, random.Random(0))


def test_a_trial_gets_the_real_agents_command_line_and_environment(tmp_path, monkeypatch):
    """wandb's Agent._command_run builds and starts the trial: ${env} ${program} ${args_no_hyphens} expanded, the
    run id, sweep id and the file of the trial's parameters in its environment (read by wandb.init in the trial)."""
    for name in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(name, "")  # the agent sets them in this process: put back after the test
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    program = tmp_path / "trial.py"
    program.write_text(
        "import json, os, sys\n"
        "env = {k: os.environ.get(k) for k in ('WANDB_SWEEP_ID', 'WANDB_RUN_ID', 'WANDB_SWEEP_PARAM_PATH')}\n"
        "open(__file__ + '.json', 'w').write(json.dumps({'argv': sys.argv, 'env': env}))\n"
    )
    sweep = {
        "program": str(program),
        "command": ["${env}", sys.executable, "${program}", "fixed=1", "${args_no_hyphens}"],
    }
    code = agent.run_trial(sweep, "swp12345", "run12345", {"optimizer.lr": 0.0003, "trainer.bf16": True})
    seen = json.loads((tmp_path / "trial.py.json").read_text())
    assert code == 0
    assert seen["argv"] == [str(program), "fixed=1", "optimizer.lr=0.0003", "trainer.bf16=True"]
    params = Path(seen["env"].pop("WANDB_SWEEP_PARAM_PATH"))
    assert seen["env"] == {"WANDB_SWEEP_ID": "swp12345", "WANDB_RUN_ID": "run12345"}
    assert params == tmp_path / "wandb" / "sweep-swp12345" / "config-run12345.yaml"
    assert yaml.safe_load(params.read_text())["optimizer.lr"] == {"value": 0.0003}


def tiny_sweep_file(tmp_path: Path) -> Path:
    """The shipped sweep file with tiny runs: its parameters, metric and command, with trainer.max_steps=200 replaced by
    a tiny model on a generated corpus, and the program named by its path (trials run in tmp_path)."""
    sweep = yaml.safe_load(SWEEP_FILE.read_text())
    at = sweep["command"].index("trainer.max_steps=200")
    (tmp_path / "corpus.txt").write_text("\n".join(sentences(300)))
    tiny = [*TINY_RUN, "dataset.path=corpus.txt", "trainer.max_steps=4", "trainer.save_model=false"]
    sweep["command"][at : at + 1] = tiny
    sweep["program"] = str(ROOT / "run.py")
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.mark.slow
def test_the_local_agent_runs_a_two_trial_sweep_of_the_shipped_file(tmp_path):
    """Two trials through wandb's agent code: each ran with its sampled values applied, in its own run directory,
    logged the sweep's metric to W&B (offline), and the stand-in ranks them by it."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the command's `python`
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    for name in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH"):
        env.pop(name, None)
    command = [sys.executable, str(ROOT / "launchers" / "wandb_local_agent.py"), "tiny_sweep.yaml", "--count", "2"]
    tiny_sweep_file(tmp_path)
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    (sweep_dir,) = (tmp_path / "wandb").glob("sweep-*")  # the agent's record of each trial's parameters
    sweep_id = sweep_dir.name.removeprefix("sweep-")
    trials = {p.stem.removeprefix("config-"): yaml.safe_load(p.read_text()) for p in sweep_dir.glob("config-*.yaml")}
    assert len(trials) == 2
    assert sorted(p.name for p in (tmp_path / "outputs" / "sweeps" / sweep_id).iterdir()) == sorted(trials)
    metrics = {}
    for run_id, params in trials.items():
        run_dir = tmp_path / "outputs" / "sweeps" / sweep_id / run_id
        config = json.loads((run_dir / "results.json").read_text())["config"]
        assert {k: config[k] for k in params if k != "wandb_version"} == {
            k: v["value"] for k, v in params.items() if k != "wandb_version"
        }
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        metrics[run_id] = min(r["eval/bits_per_char"] for r in records if "eval/bits_per_char" in r)
        (wandb_run,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")  # the W&B run has the agent's run id
        assert b"eval/bits_per_char" in next(wandb_run.glob("*.wandb")).read_bytes()  # W&B's record holds the metric
        assert "wandb.init called with sweep_config" in (run_dir / "wandb" / "debug.log").read_text()
    assert len({json.dumps(p, sort_keys=True) for p in trials.values()}) == 2  # two samples, not one twice
    ranking = proc.stdout.split("ranked by eval/bits_per_char (minimize):\n")[1].split()
    assert [w for w in ranking if w in trials] == sorted(trials, key=metrics.get)


def skypilot_task(name: str) -> dict:
    return yaml.safe_load((SKYPILOT / name).read_text())


def run_section(tmp_path: Path, name: str, env: dict, wandb: Path = None) -> subprocess.CompletedProcess:
    """A SkyPilot task's `run` script under bash, as SkyPilot runs it on a node: the task's envs and SkyPilot's variables
    set, HOME holding a stand-in venv whose `python` prints its arguments (JSON) and whose `wandb` is fake_wandb's."""
    task = skypilot_task(name)
    venv = tmp_path / "home" / "mlm-venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(
        "#!/bin/bash\nexec "
        + shlex.quote(sys.executable)
        + ' -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n'
    )
    (venv / "python").chmod(0o755)
    if wandb:
        wandb.rename(venv / "wandb")
    envs = {k: str(v) for k, v in (task.get("envs") or {}).items() if v is not None}
    outside = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_ID", "AGENTS_PER_NODE")  # this machine's
    full = {
        **{k: v for k, v in os.environ.items() if k not in outside},
        **envs,
        "HOME": str(tmp_path / "home"),
        "SKYPILOT_TASK_ID": "sky-managed-2026_mlm_1-0",
        **env,
    }
    return subprocess.run(["bash", "-c", task["run"]], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)


def test_the_one_node_task_runs_run_py_in_a_directory_named_by_the_task(tmp_path):
    proc = run_section(tmp_path, "run.yaml", {"ARGS": "optimizer.lr=3e-4 trainer.max_steps=10"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        "run.py",
        "hydra.run.dir=/checkpoints/runs/sky-managed-2026_mlm_1-0",
        "optimizer.lr=3e-4",
        "trainer.max_steps=10",
    ]
    assert skypilot_task("run.yaml")["file_mounts"]["/checkpoints"]["mode"] == "MOUNT_CACHED"


def test_the_multinode_task_gives_torchrun_skypilots_node_rank_head_node_and_gpus(tmp_path):
    """Node 1 of 2: the torchrun command the `run` script builds, read by torchrun's own parser; then the variables
    torchrun sets for its local rank 3 there, read by mlm.placement."""
    from torch.distributed.run import get_args_parser

    from mlm.placement import detect

    skypilot = {
        "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.9",
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NUM_GPUS_PER_NODE": "8",
        "ARGS": "runtime.sharding=fsdp",
    }
    proc = run_section(tmp_path, "multinode.yaml", skypilot)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)
    assert argv[:2] == ["-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(argv[2:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.master_addr, args.master_port) == ("10.0.0.7", 8008)  # the head node: SKYPILOT_NODE_IPS's first line
    assert args.training_script == "run.py"
    assert args.training_script_args == [
        "hydra.run.dir=/checkpoints/runs/sky-managed-2026_mlm_1-0",
        "runtime.sharding=fsdp",
    ]
    assert skypilot_task("multinode.yaml")["num_nodes"] == 2

    torchrun_sets = {  # torchrun's worker environment for local rank 3 of node 1 (torch.distributed.elastic.agent)
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "8",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "8008",
    }
    p = detect(torchrun_sets)
    assert (p.rank, p.world_size, p.local_rank, p.local_world_size, p.node_rank) == (11, 16, 3, 8, 1)
    assert (p.launcher, p.master_addr, p.master_port) == ("torchrun", "10.0.0.7", 8008)


def test_the_sweep_task_starts_one_agent_per_gpu_of_the_node(tmp_path):
    """Outside SLURM, without CUDA_VISIBLE_DEVICES: AGENTS_PER_NODE from SkyPilot's GPU count, GPUs 0..G-1."""
    env = fake_wandb(tmp_path, sleep=False)
    skypilot = {"SWEEP": "ent/proj/abc123", "SKYPILOT_NUM_GPUS_PER_NODE": "2", "MLM_REPO": str(tmp_path)}
    proc = run_section(
        tmp_path, "sweep.yaml", skypilot | {"FAKE_LOG": env["FAKE_LOG"]}, wandb=tmp_path / "bin" / "wandb"
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted((tmp_path / "agents.log").read_text().splitlines()) == [
        f"start {gpu} agent --count 4 --forward-signals ent/proj/abc123" for gpu in (0, 1)
    ]


SKYPILOT_PARSE = """
import json, sys
from sky.utils import dag_utils  # what `sky launch` / `sky jobs launch` load a task file with
out = {}
for path in sys.argv[1:]:
    envs = [("BUCKET", "my-bucket")] if "BUCKET" in open(path).read() else []
    envs += [("SWEEP", "ent/proj/abc123")] if "SWEEP" in open(path).read() else []
    (task,) = dag_utils.load_chain_dag_from_yaml(path, env_overrides=envs, secret_overrides=[("WANDB_API_KEY", "k" * 40)]).tasks
    out[path] = {"nodes": task.num_nodes, "accelerators": sorted(str(r.accelerators) for r in task.resources),
                 "mounts": sorted(task.storage_mounts or {}), "run": task.run}
print(json.dumps(out))
"""


@pytest.mark.skipif(
    not os.environ.get("MLM_SKYPILOT_PYTHON"), reason="MLM_SKYPILOT_PYTHON (a Python with SkyPilot) unset"
)
def test_the_skypilot_task_files_parse_with_skypilots_own_loader():
    paths = [str(SKYPILOT / n) for n in ("run.yaml", "multinode.yaml", "sweep.yaml")]
    proc = subprocess.run(
        [os.environ["MLM_SKYPILOT_PYTHON"], "-c", SKYPILOT_PARSE, *paths], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks = {Path(p).name: t for p, t in json.loads(proc.stdout.splitlines()[-1]).items()}
    assert tasks["run.yaml"] | {"run": None} == {
        "nodes": 1,
        "accelerators": ["{'A100-80GB': 1}", "{'H100': 1}"],
        "mounts": ["/checkpoints"],
        "run": None,
    }
    assert tasks["multinode.yaml"]["nodes"] == 2 and tasks["multinode.yaml"]["accelerators"] == ["{'H100': 8}"]
    assert tasks["sweep.yaml"]["mounts"] == [] and "wandb_agents.sbatch" in tasks["sweep.yaml"]["run"]
