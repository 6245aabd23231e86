"""mlm.placement, mlm.leases and mlm.job without processes: launcher variables -> placement, node lists, device slots."""

import json
import os
import multiprocessing as mp

import pytest

from mlm.config import UserError
from mlm.job import Job, export_placement
from mlm.leases import DeviceLease, slot_names
from mlm.placement import Placement, detect, launch_name, lone_launch_note, slurm_hostnames


def test_placement_imports_without_torch(monkeypatch):
    """A fresh import of mlm.placement, and of every mlm module it needs, runs no `import torch` (it would raise)."""
    import importlib
    import sys

    def ours(name):
        return name == "mlm" or name.startswith("mlm.")

    kept = {name: module for name, module in sys.modules.items() if ours(name)}
    monkeypatch.setitem(sys.modules, "torch", None)
    try:
        for name in kept:
            del sys.modules[name]
        fresh = importlib.import_module("mlm.placement")
        assert fresh.detect({"RANK": "1", "WORLD_SIZE": "2"}).world_size == 2
        with pytest.raises(ImportError):
            importlib.import_module("mlm.leases").slot_names(1)  # what does need torch imports it when asked (refused)
    finally:  # the other tests go on with the modules they imported
        for name in [m for m in sys.modules if ours(m)]:
            del sys.modules[name]
        sys.modules.update(kept)


def test_torchrun_variables_win():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    assert detect(env) == Placement(3, 4, 1, 2, 1, "torchrun", None, "n1", 29500)


def test_slurm_tasks_of_two_nodes(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list is parsed here
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "4242",
    }
    p = detect(env)
    assert (p.rank, p.world_size, p.local_rank, p.local_world_size, p.node_rank, p.launcher) == (5, 8, 1, 4, 1, "slurm")
    assert p.master_addr == "gpu07" and p.job_id == "4242"
    assert p.master_port == detect({**env, "SLURM_PROCID": "0"}).master_port  # every task derives the same port
    assert detect({**env, "MASTER_PORT": "12345"}).master_port == 12345


def test_slurm_batch_shell_with_one_task_is_a_single_process():
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) == Placement()
    # srun's step size wins over the allocation's task count
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}) == Placement()


def test_submitit_local_tasks():
    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_ID": "999",
    }
    p = detect(env)
    assert (p.rank, p.world_size, p.local_rank, p.launcher, p.master_addr) == (1, 2, 1, "submitit_local", "127.0.0.1")


def test_slurm_node_lists(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert slurm_hostnames("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert slurm_hostnames("node5") == ["node5"]
    assert slurm_hostnames("a[9-11]") == ["a9", "a10", "a11"]


def _hold(directory, n, q):
    lease = DeviceLease([f"cpu-{i}" for i in range(n)], directory)
    q.put(lease.acquire("other process"))
    q.get()  # hold until told
    lease.release()


def test_a_slot_is_never_given_twice_and_a_failed_job_gives_it_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLM_LEASE_DIR", str(tmp_path))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    other = ctx.Process(target=_hold, args=(tmp_path, 2, q))
    other.start()
    taken = q.get(timeout=60)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with Job(tmp_path / "run", device_slots=2) as placed:
                assert placed.slot == 1 - taken  # the free one
                raise RuntimeError("boom")
        with Job(tmp_path / "run2", device_slots=2) as placed:  # released by the failure
            assert placed.slot == 1 - taken
    finally:
        q.put("done")
        other.join(60)
    records = [json.loads(line) for line in (tmp_path / "lease.jsonl").read_text().splitlines()]
    assert [r["slot"] for r in records] == [1 - taken, 1 - taken, taken]


def test_mpirun_ranks():
    env = {
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "MASTER_ADDR": "n0",
    }
    p = detect(env)
    assert (p.rank, p.world_size, p.local_rank, p.local_world_size, p.launcher, p.master_addr) == (
        2,
        4,
        0,
        2,
        "mpi",
        "n0",
    )
    assert detect({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}) == Placement()


# --- GPUs and clusters, stubbed: no GPU or SLURM on the test machine --------------------------------------


def _gpus(monkeypatch, count=1, major=8, uuids=None):
    """torch.cuda as a machine with `count` GPUs of compute capability `major` would answer (CUDA not initialised)."""
    import types

    import torch

    uuids = uuids or [f"GPU-{i:08d}-aaaa" for i in range(count)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(major=major, minor=0, uuid=uuids[i])
    )
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation "works" on a V100
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("major, native", [(7, False), (8, True), (9, True)])
def test_bf16_counts_as_native_from_ampere_on_only(monkeypatch, major, native):
    from mlm.precision import native_bf16

    _gpus(monkeypatch, major=major)
    assert native_bf16("cuda") is native


BATCH_SHELL = {
    "SLURM_JOB_ID": "555",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "0",
    "SLURM_NODEID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_CPUS_ON_NODE": "8",
    "SLURM_GPUS_ON_NODE": "2",
    "SLURM_SUBMIT_DIR": "/home/u",
}


def test_a_batch_shell_of_a_four_task_allocation_is_one_process():
    assert detect(BATCH_SHELL) == Placement()
    assert (
        detect({**BATCH_SHELL, "SLURM_STEP_ID": "4294967291"}) == Placement()
    )  # the batch step's own id, where Slurm sets one


def test_srun_tasks_and_submitit_slurm_tasks_are_one_job(monkeypatch):
    monkeypatch.setenv("PATH", "")
    # srun (and so submitit's sbatch script, which starts its tasks with srun) adds the step's variables
    task = {
        **BATCH_SHELL,
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_NODELIST": "gpu[01-02]",
        "SUBMITIT_EXECUTOR": "slurm",
    }
    p = detect(task)
    assert (p.rank, p.world_size, p.local_rank, p.local_world_size, p.node_rank, p.launcher, p.master_addr) == (
        3,
        4,
        1,
        2,
        1,
        "slurm",
        "gpu01",
    )


def _cuda_rng(monkeypatch, count):
    """torch.cuda's RNG of `count` devices; like the real one, a device index it cannot see raises IndexError."""
    import torch

    states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}

    def get(device="cuda"):
        return states[0 if device == "cuda" else torch.device("cuda", device).index].clone()

    def set_(state, device="cuda"):
        index = 0 if device == "cuda" else torch.device("cuda", device).index
        if index >= count:
            raise IndexError("list index out of range")
        states[index] = state.clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[i].clone() for i in range(count)])
    return states


def test_a_checkpoint_keeps_this_devices_cuda_rng_and_resumes_on_fewer_gpus(monkeypatch):
    from mlm.checkpoint import RNG

    _gpus(monkeypatch, count=2)
    states = _cuda_rng(monkeypatch, 2)
    saved = RNG().state_dict()
    assert saved["cuda"] == states[0].tolist()  # the current device's only
    states[0].fill_(9)
    _gpus(monkeypatch, count=1)  # the resume sees one GPU
    _cuda_rng_1 = _cuda_rng(monkeypatch, 1)
    RNG().load_state_dict(saved)
    assert _cuda_rng_1[0].tolist() == saved["cuda"]


TORCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "MLM_LAUNCHER",
)


def _environ(monkeypatch, env):
    """os.environ as a launcher leaves it, restored after the test (setup() writes into it)."""
    for name in TORCH_VARS + tuple(env):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("gpus, device", [(1, 0), (2, 1)])
def test_srun_with_one_gpu_per_task_gives_accelerate_and_ddp_device_0(monkeypatch, gpus, device):
    import os

    _gpus(monkeypatch, count=gpus)
    _environ(
        monkeypatch,
        {
            "SLURM_JOB_ID": "9",
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": "1",
            "SLURM_LOCALID": "1",
            "SLURM_NODEID": "0",
            "SLURM_STEP_NODELIST": "localhost",
        },
    )
    p = export_placement()
    # Accelerate's device is LOCAL_RANK % device_count, DDP's device_ids and barriers [LOCAL_RANK]: both this one
    assert os.environ["LOCAL_RANK"] == str(device) and p.local_rank == device and p.rank == 1
    assert export_placement() == p  # idempotent


def test_torchrun_local_rank_1_with_one_visible_gpu(monkeypatch):
    import os

    _gpus(monkeypatch, count=1)
    _environ(monkeypatch, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    export_placement()
    assert os.environ["LOCAL_RANK"] == "0"


def test_gpu_slots_are_named_by_uuid_whatever_index_the_job_sees(monkeypatch):
    _gpus(monkeypatch, count=1, uuids=["GPU-3f1e"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # under SLURM's cgroups every job sees its GPU as 0
    assert slot_names(0) == ["cuda-GPU-3f1e"]
    _gpus(monkeypatch, count=2, uuids=["GPU-aa", "GPU-bb"])
    assert slot_names(0) == ["cuda-GPU-aa", "cuda-GPU-bb"] and slot_names(5) == [
        "cuda-GPU-aa",
        "cuda-GPU-bb",
    ]
    assert slot_names(1) == ["cuda-GPU-aa"]


def test_releasing_a_gpu_lease_empties_the_cuda_cache(tmp_path, monkeypatch):
    import torch

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    lease = DeviceLease(["cuda-GPU-aa"], tmp_path)
    lease.acquire()
    lease.release()
    assert emptied == [1]
    lease = DeviceLease(["cpu-0"], tmp_path)
    lease.acquire()
    lease.release()
    assert emptied == [1]


def test_a_symlink_planted_in_the_lease_dir_is_never_followed(tmp_path, caplog):
    leases, victim = tmp_path / "leases", tmp_path / "victim.txt"
    victim.write_text("precious\n")
    leases.mkdir(mode=0o755)
    (leases / "lease.jsonl").symlink_to(victim)
    lease = DeviceLease(["cpu-0"], leases)
    assert lease.acquire() == 0
    lease.release()
    assert victim.read_text() == "precious\n" and "is a symlink" in caplog.text
    assert (leases.stat().st_mode & 0o777) == 0o700
    (leases / "cpu-1.lock").symlink_to(victim)
    with pytest.raises(UserError, match="cpu-1.lock is a symlink"):
        DeviceLease(["cpu-1"], leases).acquire()
    assert victim.read_text() == "precious\n"


def test_a_lease_dir_of_another_user_is_refused(tmp_path, monkeypatch):
    import os

    leases = tmp_path / "leases"
    leases.mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(leases).st_uid + 1)  # as if another user had made it
    with pytest.raises(UserError, match="MLM_LEASE_DIR"):
        DeviceLease(["cpu-0"], leases).acquire()


def test_derived_ports_differ_per_step_and_stay_below_the_ephemeral_range():
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "localhost"}
    ports = {detect({**env, "SLURM_STEP_ID": str(step)}).master_port for step in range(20)}
    assert len(ports) > 15  # two steps of one job (two sruns side by side) rarely share one
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert all(1024 < p < low for p in ports), (sorted(ports), low)


def test_torchrun_on_two_nodes_names_its_run_dir_after_the_rendezvous_id(monkeypatch):
    two_nodes = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    _environ(monkeypatch, {**two_nodes, "TORCHELASTIC_RUN_ID": "exp/7"})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch_name() == "torchrun-exp_7"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: no --rdzv-id given
    with pytest.raises(UserError, match="4 processes on 2 nodes need one run directory"):
        launch_name()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one node: the launch time serves
    assert launch_name() is None


# what `accelerate launch` (1.16) sets in the one process it starts on CPU: MASTER_* only when several were asked for
ACCELERATE_ONE_OF_TWO = {
    "ACCELERATE_USE_CPU": "True",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "ACCELERATE_MIXED_PRECISION": "no",
}


def test_accelerate_launch_of_several_cpu_processes_that_starts_one_says_how_to_start_several(tmp_path):
    import subprocess
    import sys

    assert "torchrun --nproc_per_node <N> run.py" in lone_launch_note(ACCELERATE_ONE_OF_TWO)
    one = {k: v for k, v in ACCELERATE_ONE_OF_TWO.items() if not k.startswith("MASTER_")}
    assert lone_launch_note(one) is None  # --num_processes 1: as asked
    assert lone_launch_note({**ACCELERATE_ONE_OF_TWO, "RANK": "0", "WORLD_SIZE": "2"}) is None  # several started
    assert lone_launch_note({}) is None
    # the real launcher, once: the process it starts has that environment (7 s here)
    script = tmp_path / "note.py"
    script.write_text("from mlm.placement import lone_launch_note\nprint(lone_launch_note())\n")
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
    ]
    proc = subprocess.run(
        accelerate, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == lone_launch_note(ACCELERATE_ONE_OF_TWO)
