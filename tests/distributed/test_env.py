"""The rendezvous of a torch.distributed job read from torchrun's or Slurm's environment."""

from __future__ import annotations

import shutil

import pytest

from trinity.distributed.env import DistEnv, dist_env, expand_tasks_per_node, first_host, first_host_of, slurm_port


def test_dist_env_reads_torchrun_variables() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29411",
        # torchrun's variables win over Slurm's (torchrun started inside a Slurm job)
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "5",
    }
    assert dist_env(env) == DistEnv(3, 8, 1, 2, "10.0.0.7", 29411)
    assert not dist_env(env).is_primary


def test_dist_env_reads_slurm_variables_of_a_multi_task_job() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "123456",
    }
    got = dist_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (5, 8, 1, 4)
    assert got.master_addr == "gpu007"
    assert got.master_port == 20000 + 123456 % 20000 == slurm_port("123456")
    assert got.torchrun_variables() == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(got.master_port),
    }
    # SLURM_NTASKS_PER_NODE (set with --ntasks-per-node) is read first
    assert dist_env({**env, "SLURM_NTASKS_PER_NODE": "2"}).local_world_size == 2


def test_dist_env_without_a_launcher_is_one_process() -> None:
    assert dist_env({"PATH": "/bin"}) == DistEnv(0, 1, 0, 1, "127.0.0.1", 29500)
    assert dist_env({}).is_primary


def test_slurm_lists_expand_as_slurm_writes_them() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    assert first_host_of("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host_of("node12,node3") == "node12"
    assert first_host_of("vm") == "vm"
    if shutil.which("scontrol"):  # the same answer as Slurm's own expansion (no controller needed)
        for nodelist in ("gpu[003-005,9],cpu1", "a[1-2]b", "node12,node3"):
            assert first_host(nodelist) == first_host_of(nodelist) or nodelist == "a[1-2]b"
    with pytest.raises(ValueError, match="tasks per node"):
        expand_tasks_per_node("2(x)")
