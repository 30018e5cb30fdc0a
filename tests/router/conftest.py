"""A real router (gRPC server on loopback) serving from a background event loop.

Routers here have no workers: everything the router decides on its own (validation,
overload, unknown ids, health, reflection) is checked without starting Ray.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Collection
from pathlib import Path

import pytest

from pdserve.api.tokenizer import Tokenizer
from pdserve.router.auth import ServerTLS
from pdserve.router.router import Router

MAX_MODEL_LEN = 64


class RouterThread:
    """Runs a `Router` on its own event loop thread; `target` is its HOST:PORT."""

    def __init__(
        self,
        router: Router,
        tls: ServerTLS | None = None,
        api_keys: Collection[str] = (),
        http_listen: str | None = None,
        openai: bool = False,
    ) -> None:
        self.router = router
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        port = self.run(
            router.start(
                "127.0.0.1:0", tls=tls, api_keys=api_keys, http_listen=http_listen, openai=openai
            )
        )
        self.target = f"127.0.0.1:{port}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def hold_kv_pool(self) -> None:
        """Gives the worker-less router a one-block decode pool and charges it, so that every
        request waits in its admission queue (and stays abortable) until it is stopped."""
        self.router.admission.set_capacity("decode-0", 1)
        self.run(self.router.admission.acquire(1))

    def wait_queued(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.router.num_queued != n:
            assert time.monotonic() < deadline, f"{self.router.num_queued} queued, not {n}"
            time.sleep(0.01)

    def stop(self) -> None:
        self.run(self.router.stop(0.5))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(tiny_llama_dir)


@pytest.fixture(scope="session")
def start_router(tokenizer):
    """Starts a worker-less router; `tls`, `api_keys`, `http_listen` and `openai` go to
    `Router.start`, `kwargs` to `Router`. The caller stops it."""

    def start(*, tls=None, api_keys=(), http_listen=None, openai=False, **kwargs) -> RouterThread:
        kwargs.setdefault("vocab_size", tokenizer.vocab_size)
        kwargs.setdefault("max_model_len", MAX_MODEL_LEN)
        router = Router(tokenizer, {}, {}, model_name="tiny-llama", **kwargs)
        return RouterThread(router, tls, api_keys, http_listen, openai)

    return start


@pytest.fixture(scope="module")
def server(start_router):
    running = start_router()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key
