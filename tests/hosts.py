"""Simulated SageMaker instances: one `train` process per host, each with its own /opt/ml tree (hosts and
current_host in resourceconfig.json), meeting on 127.0.0.1, as a multi-instance job's containers meet on eth0."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from imgclf import local, processes
from imgclf.training import distributed

from tests.conftest import free_port


def run_hosts(tmp_path: Path, hps: dict, channels: dict[str, dict[str, Path]],
              adjust: Callable[[Path], None] = lambda base: None) -> tuple[dict[str, Path], dict[str, str]]:
    """Run `train` on each host of `channels` (host -> its channels) until all end; (host -> its /opt/ml tree,
    host -> its output). Each must succeed. `adjust(tree)` edits a tree before its process starts; checkpoints go
    to tmp_path/ckpt-<host>. One thread each (OMP_NUM_THREADS=1): the same kernels, so the same numbers, as two
    processes on one host."""
    port, hosts = free_port(), list(channels)
    bases = {host: tmp_path / host for host in hosts}
    procs = {}
    for host in hosts:
        local.write_tree(bases[host], hps, channels[host], hosts=hosts, current_host=host)
        adjust(bases[host])
        env = local.training_env(bases[host], tmp_path / f"ckpt-{host}", {
            distributed.MASTER_ADDR_ENV: "127.0.0.1", distributed.MASTER_PORT_ENV: str(port), "OMP_NUM_THREADS": "1"})
        procs[host] = subprocess.Popen([processes.venv_bin("train")], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    logs = {}
    try:
        for host, proc in procs.items():
            logs[host] = proc.communicate(timeout=600)[0]
    finally:
        for proc in procs.values():
            proc.kill()
    for host, proc in procs.items():
        assert proc.returncode == 0, f"{host}:\n{logs[host][-4000:]}"
    return bases, logs
