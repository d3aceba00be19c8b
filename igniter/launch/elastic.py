"""A fresh key-value store for every torchrun restart.

torchrun's elastic agent hosts one TCPStore for the whole job (``TORCHELASTIC_USE_AGENT_STORE=True``,
c10d and static rendezvous alike) and hands its address to every generation of workers as
``MASTER_ADDR``/``MASTER_PORT``. ``init_process_group`` writes its keys (gloo's and NCCL's
peer addresses among them) under the same names in every generation, so once torchrun has
restarted the workers (``--max-restarts``) a new worker can read the address a *dead* worker
left behind and fail in gloo's ``connectFullMesh`` ("Connection refused") or hang. This is
PyTorch issue #135712; the restart counter is no fix because it is not the same on every
node (PyTorch issue #108158).

Here rank 0 starts a TCPStore of its own on a free port and publishes ``host:port`` plus a
random token through the agent's store. The other ranks read the entry and check the token
in the store they reach: an entry left by a previous generation points to a dead server
(or, should the port be reused, to a server without that token), so they read again until
rank 0 of their own generation has written it.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

from igniter.launch.environment import Torchrun

__all__ = ["uses_agent_store", "generation_store"]

_ENTRY = "igniter/generation_store"
_TOKEN = "igniter/token"
_PROBE_S = 3.0  # how long a worker tries to reach a published store before reading the entry again


def uses_agent_store() -> bool:
    """Whether the process was started by torchrun with the agent-hosted store (torch >= 2.4 default)."""
    return Torchrun().uses_agent_store


def generation_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The store this generation of workers initializes its process group with.

    Args:
        rank: global rank of this process (``RANK``).
        world_size: number of processes (``WORLD_SIZE``).
        timeout: how long to wait for rank 0 to publish its store.

    Raises:
        TimeoutError: rank 0 did not publish a reachable store within ``timeout``.
        RuntimeError: torchrun's ``MASTER_ADDR``/``MASTER_PORT`` (the agent's store) are not set.
    """
    torchrun = Torchrun()
    host, port = torchrun.master_addr, torchrun.master_port
    if host is None or port is None:
        raise RuntimeError("MASTER_ADDR and MASTER_PORT must be set by torchrun (the agent's store)")
    agent = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if rank == 0:
        # rank 0 runs on the node of the agent that hosts MASTER_ADDR (rendezvous rank 0)
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set(_TOKEN, token)
        agent.set(_ENTRY, json.dumps([host, store.port, token]))
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        addr, store_port, token = json.loads(agent.get(_ENTRY))  # waits until the entry exists
        try:
            store = dist.TCPStore(addr, store_port, world_size, is_master=False, timeout=timedelta(seconds=_PROBE_S))
            if store.get(_TOKEN).decode() == token:
                return store
        except (RuntimeError, dist.DistError):  # a previous generation's store: gone
            pass
        time.sleep(0.1)
    raise TimeoutError(
        f"rank {rank}: rank 0 did not publish its store at {host}:{port} within {timeout.total_seconds():.0f} s"
    )
