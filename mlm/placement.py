"""Which process am I in my job, whatever the launcher: read from the environment only (no torch here).

Launchers describe a multi-process job in their own variables: torchrun and `accelerate launch` set
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; SLURM tasks (srun, submitit's slurm launcher) get SLURM_*;
submitit's local tasks get SUBMITIT_LOCAL_*; mpirun its OMPI_*/PMI_*/MV2_*. `detect()` reads any of them;
Accelerate reads only the first kind, so `mlm.job.export_placement()` exports the torch variables from the
others before the Accelerator exists. Everything that asks "am I the main process / how many processes" asks
this module.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from typing import List, Mapping, Optional

from mlm.config import UserError


@dataclass(frozen=True)
class Placement:
    """Where this process sits in its job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    launcher: str = "single"  # single | torchrun | slurm | submitit_local | mpi
    job_id: Optional[str] = None  # SLURM or submitit job id, when there is one
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def detect(env: Optional[Mapping[str, str]] = None) -> Placement:
    """The placement this process's launcher describes (read only; mlm.job.export_placement() exports it)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, accelerate launch, or a previous export_placement()
        launcher = env.get("MLM_LAUNCHER", "torchrun")  # export_placement() leaves its source here
        job_id = env.get("SUBMITIT_LOCAL_JOB_ID") if launcher == "submitit_local" else env.get("SLURM_JOB_ID")
        return Placement(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            _int(env, "LOCAL_RANK", default=0),
            _int(env, "LOCAL_WORLD_SIZE", "WORLD_SIZE", default=1),
            _int(env, "GROUP_RANK", default=0),
            launcher,
            job_id,
            env.get("MASTER_ADDR"),
            _int(env, "MASTER_PORT", default=0) or None,
        )
    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        job_id = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
        n = _int(env, "SUBMITIT_LOCAL_NTASKS", default=1)
        return Placement(
            int(env["SUBMITIT_LOCAL_GLOBALID"]),
            n,
            _int(env, "SUBMITIT_LOCAL_LOCALID", default=0),
            n,
            0,
            "submitit_local",
            job_id,
            "127.0.0.1",
            _port(env, job_id),
        )
    # Only srun sets SLURM_STEP_NUM_TASKS, for the tasks it starts (submitit's slurm tasks too: its sbatch
    # script runs them under srun). A batch script's own shell has SLURM_NTASKS and SLURM_PROCID=0 of
    # the whole allocation but is one process: taking it for rank 0 of SLURM_NTASKS waits for peers forever.
    n = _int(env, "SLURM_STEP_NUM_TASKS", default=1)
    if "SLURM_PROCID" in env and n > 1:
        job_id = env.get("SLURM_JOB_ID", "0")
        nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=1)
        nodelist = (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        )
        return Placement(
            int(env["SLURM_PROCID"]),
            n,
            _int(env, "SLURM_LOCALID", default=0),
            max(1, n // max(nodes, 1)),
            _int(env, "SLURM_NODEID", default=0),
            "slurm",
            job_id,
            env.get("MASTER_ADDR") or slurm_hostnames(nodelist)[0],
            _port(env, job_id),
        )
    for prefix in ("OMPI_COMM_WORLD_", "PMI_", "MV2_COMM_WORLD_"):  # mpirun (Accelerate's multi-CPU launches too)
        n = _int(env, prefix + "SIZE", default=1)
        if n > 1:
            local_n = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE", default=n)
            return Placement(
                _int(env, prefix + "RANK", default=0),
                n,
                _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", default=0),
                local_n,
                0,
                "mpi",
                None,
                env.get("MASTER_ADDR") or ("127.0.0.1" if local_n == n else None),
                _int(env, "MASTER_PORT", default=29500),
            )
    return Placement()


def lone_launch_note(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """One line when `accelerate launch --num_processes N` (N > 1) started this process alone: without GPUs (or with
    --cpu) Accelerate 1.x runs the script once, with MASTER_ADDR/PORT set for N processes and no rank, unless under
    mpirun (--mpirun_hostfile). None otherwise."""
    env = os.environ if env is None else env
    if "ACCELERATE_USE_CPU" not in env or not env.get("MASTER_PORT") or detect(env).world_size > 1:
        return None
    return (
        "accelerate launch started this one process, not the --num_processes asked for (on CPU it starts several only "
        "under mpirun, --mpirun_hostfile); for several processes here: torchrun --nproc_per_node <N> run.py ..."
    )


# derived rendezvous ports: below Linux's ephemeral range (32768-60999 by default), which outgoing connections take
PORTS = (20000, 32768)


def _port(env: Mapping[str, str], job_id: str) -> int:
    """MASTER_PORT if set, else one derived from the job id and step: every task of a job step computes
    the same, and two steps of one job (two sruns side by side) get different ones."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return PORTS[0] + zlib.crc32(f"{job_id}.{env.get('SLURM_STEP_ID', '')}".encode()) % (PORTS[1] - PORTS[0])


@functools.lru_cache(maxsize=8)
def slurm_hostnames(nodelist: str) -> List[str]:
    """Expand a SLURM node list ("gpu[01-03,07],login1"): scontrol when present, else the common forms."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout
            if out.split():
                return out.split()
        except (OSError, subprocess.SubprocessError):
            pass
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def rank() -> int:
    return detect().rank


def is_main_process() -> bool:
    return rank() == 0


def launch_name() -> Optional[str]:
    """A run-directory name all tasks of one launch agree on, whatever their node: for SLURM tasks and
    torchrun on several nodes inside SLURM, the job (and step); for torchrun on several nodes elsewhere,
    its --rdzv-id. None on one node (the launch time serves); UserError where nothing is shared."""
    p = detect()
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID", "")
    if job and (p.launcher == "slurm" or p.world_size > p.local_world_size):
        return f"slurm-{job}" + (f".{step}" if step.isdigit() and int(step) < 2**31 else "")  # batch/extern: huge ids
    if p.world_size > p.local_world_size:  # each node's start second differs: one run directory per node
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # torchrun's --rdzv-id; "none" when not given
        if run_id == "none":
            raise UserError(
                f"{p.world_size} processes on {p.world_size // p.local_world_size} nodes need one run directory: "
                "set hydra.run.dir=<shared path> (with torchrun: or give --rdzv-id=<name>)"
            )
        return "torchrun-" + re.sub(r"[^\w.-]", "_", run_id)
    return None
