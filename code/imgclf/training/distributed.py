"""Data-parallel training over several processes and hosts with PyTorch's own tools: torchrun, DDP, gloo/NCCL.

SageMaker runs `train` once per host and gives every host the same resourceconfig.json (all hosts, this
host). With more than one process in the job (hosts x processes-per-host), that first process is only a
launcher: it checks hyperparameters and data, then runs torchrun, which starts one worker per GPU (or the
configured number of CPU processes) running the training job module (imgclf.training.job) with
RANK/LOCAL_RANK/WORLD_SIZE set, forwards SIGTERM to them and waits. The first host is the master (its node
rank is 0 and it serves the rendezvous store); IMGCLF_MASTER_ADDR / IMGCLF_MASTER_PORT override its address
(simulated hosts, tests).

In the workers a `Context` holds the rank and does the few collective operations the training loop needs:
sums of running metrics, evaluation results, agreeing to stop at the same step, the checkpoint read by
rank 0 and given to all, and the DistributedDataParallel wrapper. One process (world size 1) uses
`SINGLE`, whose operations do nothing, so the loop reads the same either way.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from imgclf.errors import HyperparameterError, UserError
from imgclf.processes import run_forwarding_signals
from imgclf.training.evaluate import Evaluation

log = logging.getLogger(__name__)
MASTER_ADDR_ENV = "IMGCLF_MASTER_ADDR"
MASTER_PORT_ENV = "IMGCLF_MASTER_PORT"
DEFAULT_MASTER_PORT = 29500  # torch.distributed's default
WORKER_MODULE = "imgclf.training.job"  # what torchrun runs in each worker (python -m)


class WorkersFailed(UserError):
    """torchrun ended with an error; the workers' own messages are in the log and the failure file (a UserError
    so that the toolkit logs this one line rather than the launcher's traceback)."""


@dataclass(frozen=True)
class Plan:
    """How many processes run where: every host computes the same plan from the same resourceconfig."""
    hosts: tuple[str, ...]
    current_host: str
    processes_per_host: int
    gpus: int  # on this host
    master_addr: str
    master_port: int
    interface: str  # network interface of the hosts (resourceconfig network_interface_name)

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.processes_per_host

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    def command(self) -> list[str]:
        """torchrun (python -m torch.distributed.run) starting this host's workers."""
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.processes_per_host}"]
        if len(self.hosts) == 1:
            cmd.append("--standalone")  # rendezvous on localhost, on a free port
        else:
            cmd += [f"--nnodes={len(self.hosts)}", f"--node-rank={self.node_rank}",
                    f"--master-addr={self.master_addr}", f"--master-port={self.master_port}"]
        return [*cmd, "-m", WORKER_MODULE]

    def environment(self) -> dict[str, str]:
        """Variables for the workers: CPU threads shared between them, the network interface for gloo/NCCL."""
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.processes_per_host))}
        if has_interface(self.interface):
            env.update({"GLOO_SOCKET_IFNAME": self.interface, "NCCL_SOCKET_IFNAME": self.interface})
        else:  # gloo would stop at "Unable to find address for: ethwe"; unset, gloo takes this host name's address
            log.warning("resourceconfig.json names network interface %r, which this host lacks: gloo and NCCL "
                        "choose the interface themselves", self.interface)
        # What the user set wins (e.g. NCCL_SOCKET_IFNAME=^docker0).
        return {k: v for k, v in env.items() if k not in os.environ}

    def describe(self) -> str:
        device = f"{self.gpus} GPU(s)" if self.gpus else "CPU"
        return (f"{len(self.hosts)} host(s) x {self.processes_per_host} process(es) = world size {self.world_size}; "
                f"this host {self.current_host} is node {self.node_rank} ({device}); master "
                + ("localhost" if len(self.hosts) == 1 else f"{self.master_addr}:{self.master_port}"))


def has_interface(name: str) -> bool:
    """Whether this host has the network interface `name`. resourceconfig.json may name one it lacks: the SDK's
    ModelTrainer in local-container mode writes `ethwe`, and its compose containers have eth0."""
    try:
        return name in {found for _, found in socket.if_nameindex()}
    except OSError:  # cannot tell: keep the one named
        return True


def make_plan(hosts: list[str], current_host: str, processes_per_host: int, interface: str = "eth0",
              gpus: int | None = None) -> Plan:
    """processes-per-host 0 = one per GPU, or 1 without a GPU."""
    gpus = (torch.cuda.device_count() if torch.cuda.is_available() else 0) if gpus is None else gpus
    if current_host not in hosts:
        raise HyperparameterError(f"resourceconfig.json: current_host {current_host!r} is not among hosts {hosts}")
    if gpus and processes_per_host > gpus:
        raise HyperparameterError(f"hyperparameter processes-per-host={processes_per_host}: this host has {gpus} "
                                  "GPU(s) and each process needs its own; use 0 (one per GPU) or at most "
                                  f"{gpus}")
    per_host = processes_per_host or max(gpus, 1)
    try:
        port = int(os.environ.get(MASTER_PORT_ENV, DEFAULT_MASTER_PORT))
    except ValueError:
        raise HyperparameterError(f"{MASTER_PORT_ENV}={os.environ[MASTER_PORT_ENV]!r}: expected a port number") \
            from None
    return Plan(tuple(hosts), current_host, per_host, gpus, os.environ.get(MASTER_ADDR_ENV, hosts[0]), port,
                interface)


def launch(plan: Plan) -> None:
    """Run torchrun for this host and wait; SIGTERM/SIGINT go to it (it passes them to the workers)."""
    log.info("distributed training: %s", plan.describe())
    code = run_forwarding_signals(plan.command(), {**os.environ, **plan.environment()})
    if code != 0:
        raise WorkersFailed(f"training workers failed (torchrun exit code {code}); the log names each rank's error")


def is_worker() -> bool:
    """A process torchrun started (it sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def log_tag() -> str:
    """`[rank 1/4] ` in a worker's log lines, nothing in a single process."""
    return f"[rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}] " if is_worker() else ""


def sample_digest(indices: list[int]) -> str:
    """Which samples a rank trained on (order-independent): what the per-rank epoch log line shows."""
    return hashlib.sha256(",".join(map(str, sorted(indices))).encode()).hexdigest()[:16]


@dataclass
class Context:
    """This process's place in the job; the collective operations are no-ops with world size 1."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    _ddp: tuple[tuple, nn.Module] | None = field(default=None, repr=False)
    local_world_size: int = 1  # the processes of this host (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the model, reports, checkpoints and metric lines."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of an evaluation split (strided, no padding: every sample counted once)."""
        return items[self.rank::self.world_size]

    def _tensor(self, values: list[float]) -> torch.Tensor:
        device = self.device if self.device is not None and self.device.type == "cuda" else "cpu"
        return torch.tensor(values, dtype=torch.float64, device=device)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all ranks."""
        if self.world_size == 1:
            return list(values)
        t = self._tensor(values)
        dist.all_reduce(t)
        return t.tolist()

    def reduce_evaluation(self, ev: Evaluation) -> Evaluation:
        """Combine the ranks' evaluations of their shards: confusion counts and loss sums add up."""
        if self.world_size == 1:
            return ev
        seen = int(ev.confusion.sum())
        smoothed = ev.smoothed_loss  # every rank computes it or none does (the same hyperparameters)
        values = self.sum([ev.loss * seen, (smoothed or 0.0) * seen, *ev.confusion.flatten().tolist()])
        confusion = torch.tensor(values[2:], dtype=torch.float64).round().long().view_as(ev.confusion)
        total = int(confusion.sum())
        return Evaluation(values[0] / max(total, 1), float(confusion.diag().sum()) / max(total, 1), confusion,
                          values[1] / max(total, 1) if smoothed is not None else None)

    def max(self, value: int) -> int:
        """The largest of the ranks' values."""
        if self.world_size == 1:
            return value
        t = self._tensor([float(value)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def first_error(self, error: BaseException | None) -> BaseException | None:
        """Collective: the first rank's error (stop request, rule stop) for every rank, or None when no rank has
        one; so that all ranks stop at the same step instead of some waiting for the others forever."""
        if self.world_size == 1:
            return error
        if not self.sum([1.0 if error is not None else 0.0])[0]:
            return None
        errors: list[BaseException | None] = [None] * self.world_size
        dist.all_gather_object(errors, error)
        return next(e for e in errors if e is not None)

    def from_main(self, read: Callable[[], Any]) -> Any:
        """`read()` on rank 0 only, its result (or its exception) on every rank: e.g. the checkpoint, which
        only rank 0's host is sure to have."""
        result, error = None, None
        if self.is_main:
            try:
                result = read()
            except Exception as e:  # raised on every rank below
                error = e
        if self.world_size > 1:
            box = [(result, error)]
            cuda = self.device is not None and self.device.type == "cuda"
            dist.broadcast_object_list(box, src=0, device=self.device if cuda else None)
            result, error = box[0]
        if error is not None:
            raise error
        return result

    def same_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics, and the EMA's average of them) on every rank. DDP sends
        them at the start of each training forward, so after an epoch's last step each rank holds its own: every
        rank then validates the model rank 0 saves, and a run resumed at an epoch's end validates what an
        uninterrupted run does."""
        if self.world_size == 1:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to run training steps through: DistributedDataParallel (gradients averaged over the ranks)
        when there are several. DDP covers the parameters that train when it is built, so a new wrapper is made
        when that set changes (freeze=head-then-all; the head alone on cached features); the old one is dropped
        first, which removes its gradient hooks."""
        if self.world_size == 1:
            return module
        key = (id(module), tuple(p.requires_grad for p in module.parameters()))
        if self._ddp is None or self._ddp[0] != key:
            self._ddp = None
            gc.collect()
            cuda = self.device is not None and self.device.type == "cuda"
            self._ddp = (key, nn.parallel.DistributedDataParallel(module, device_ids=[self.device] if cuda else None))
        return self._ddp[1]


SINGLE = Context()


@contextmanager
def worker():
    """The process group of a torchrun worker (NCCL on its own GPU, gloo on CPU) while it trains."""
    rank, world, local, local_world = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "LOCAL_WORLD_SIZE"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    log.info("process group ready: rank %d of %d (local rank %d) on %s, backend %s", rank, world, local, device,
             dist.get_backend())
    yield Context(rank, world, local, device, local_world_size=local_world)
    # Not after an error: with NCCL, tearing down while another rank waits in a collective can hang.
    dist.destroy_process_group()

