"""mlm.distributed without processes: launcher variables -> placement, node lists, device slots."""

import json
import multiprocessing as mp

import pytest

from mlm import distributed
from mlm.distributed import DeviceLease, Placement, detect, slurm_hostnames


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert detect(env) == Placement(3, 4, 1, 2, 1, "torchrun", None, "n1", 29500)


def test_slurm_tasks_of_two_nodes(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list is parsed here
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
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
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
           "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "999"}
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
            with distributed.job(tmp_path / "run", device_slots=2) as placed:
                assert placed["slot"] == 1 - taken  # the free one
                raise RuntimeError("boom")
        with distributed.job(tmp_path / "run2", device_slots=2) as placed:  # released by the failure
            assert placed["slot"] == 1 - taken
    finally:
        q.put("done")
        other.join(60)
    records = [json.loads(line) for line in (tmp_path / "lease.jsonl").read_text().splitlines()]
    assert [r["slot"] for r in records] == [1 - taken, 1 - taken, taken]


def test_mpirun_ranks():
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
           "MASTER_ADDR": "n0"}
    p = detect(env)
    assert (p.rank, p.world_size, p.local_rank, p.local_world_size, p.launcher, p.master_addr) == (2, 4, 0, 2, "mpi", "n0")
    assert detect({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}) == Placement()
