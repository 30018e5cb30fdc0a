"""torch.distributed on one address only: a rendezvous store that listens there, and groups
whose gloo pairs bind it."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def bound_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The hosting side's `TCPStore`, listening on `host` only; its `.port` is the address to
    hand out.

    NOTE: a TCPStore given a host name still listens on every interface, so it is handed a
    socket already bound to `host` (the store owns the descriptor from then on)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    fd = socket.create_server((host, 0), family=family, backlog=16).detach()
    try:
        return dist.TCPStore(
            host,
            0,
            world_size,
            True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=fd,
        )
    except BaseException:
        os.close(fd)
        raise


def bound_group(
    store: dist.Store, rank: int, size: int, host: str, device: torch.device, timeout_s: float
) -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
    """A group of `size` processes over `store`: NCCL for CUDA tensors, gloo for CPU tensors,
    whose pairs listen on `host` (this process's address) rather than the interface gloo picks
    by default (the one the machine's host name resolves to). Blocks until all joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        nccl = dist.ProcessGroupNCCL.Options()
        nccl._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, nccl)
    gloo = dist.ProcessGroupGloo._Options()
    gloo._timeout = timeout
    gloo._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, size, gloo)
