"""A torch.distributed rendezvous store that listens on one address only."""

from __future__ import annotations

import datetime
import os
import socket

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
