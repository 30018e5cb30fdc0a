"""API keys and TLS on a real router: `Generation` calls need a key, health and reflection stay
open for load balancers, and a TLS router answers only clients that speak TLS."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import GENERATE, health_status
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.api.client import AsyncClient, Client, build_request
from pdserve.cluster.cli import main
from pdserve.cluster.config import config_from_dict
from pdserve.cluster.launcher import Workers, start_router
from pdserve.router.auth import ServerTLS

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def keyed(start_router):
    running = start_router(api_keys=KEYS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def secure(start_router, tls_files):
    """A router as an operator exposes it: TLS and API keys."""
    running = start_router(tls=ServerTLS.from_files(*tls_files), api_keys=KEYS)
    yield running
    running.stop()


def generate_with(target: str, authorization: str | None, raw: bytes | None = None):
    """One raw Generate call with the given `authorization` metadata; its status."""
    raw = raw if raw is not None else build_request("hello", max_tokens=4).SerializeToString()
    metadata = None if authorization is None else (("authorization", authorization),)
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream(GENERATE, request_serializer=lambda b: b)
        try:
            list(call(raw, timeout=10, metadata=metadata))
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


CALLS = {
    "generate": lambda c: c.complete("hello", max_tokens=4, timeout=10),
    "abort": lambda c: c.abort("some-request", timeout=10),
    "status": lambda c: c.status(timeout=10),
}


@pytest.mark.parametrize("call", CALLS)
def test_every_generation_call_without_a_key_is_unauthenticated(keyed, call):
    with Client(keyed.target) as client, pytest.raises(grpc.RpcError) as info:
        CALLS[call](client)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in info.value.details()


def test_a_request_without_a_key_is_refused_before_it_is_read(keyed):
    code, _ = generate_with(keyed.target, None, raw=b"\xff\xff\xff")
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong", "Bearer key-one-and-more", "Bearer key-on", "Bearer ", "Basic key-one", ""],
)
def test_a_wrong_key_is_unauthenticated(keyed, authorization):
    code, details = generate_with(keyed.target, authorization)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "key-one" not in details


@pytest.mark.parametrize("authorization", ["Bearer key-one", "Bearer key-two", "bearer key-two"])
def test_a_known_key_lets_the_request_through(keyed, authorization):
    # without workers a valid request ends UNAVAILABLE: it passed auth and validation
    code, details = generate_with(keyed.target, authorization)
    assert code == grpc.StatusCode.UNAVAILABLE and "worker" in details


def test_the_client_sends_its_key_with_every_call(keyed):
    with Client(keyed.target, api_key="key-two") as client:
        assert client.status(timeout=10).model == "tiny-llama"
        with pytest.raises(grpc.RpcError) as info:
            client.abort("no-such-request", timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            client.complete("hello", max_tokens=4, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["", "pdserve.v1.Generation"])
def test_health_answers_without_a_key(keyed, service):
    assert health_status(keyed.target, service) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_answers_without_a_key(keyed):
    with grpc.insecure_channel(keyed.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (listed,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    assert "pdserve.v1.Generation" in {s.name for s in listed.list_services_response.service}


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "pem"])
def test_a_tls_client_trusting_the_cert_gets_through(secure, tls_files, as_bytes):
    cert = tls_files[0].read_bytes() if as_bytes else str(tls_files[0])
    with Client(secure.target, api_key="key-one", root_cert=cert) as client:
        assert client.status(timeout=10).model == "tiny-llama"
    with Client(secure.target, root_cert=cert) as client, pytest.raises(grpc.RpcError) as info:
        client.status(timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_plaintext_client_cannot_reach_a_tls_router(secure):
    with Client(secure.target, api_key="key-one") as client, pytest.raises(grpc.RpcError) as info:
        client.status(timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_over_tls_answers_without_a_key(secure, tls_files):
    credentials = grpc.ssl_channel_credentials(tls_files[0].read_bytes())
    with grpc.secure_channel(secure.target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# Each command with the right key gets past auth: status prints the worker-less cluster,
# generate reaches placement, bench reads the context size (then refuses the workload).
COMMANDS = {
    "status": (["status"], "NOT serving"),
    "generate": (["generate", "hello", "--max-tokens", "4"], "UNAVAILABLE"),
    "bench": (["bench", "--prompt-len", "60", "--max-tokens", "60"], "context of 64 tokens"),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_the_cli_reaches_a_secured_router(secure, tls_files, command, monkeypatch, capsys):
    argv, passed = COMMANDS[command]
    argv = [*argv, "--server", secure.target, "--tls-root-cert", str(tls_files[0])]

    def run(*extra: str) -> str:
        try:
            main([*argv, *extra])
        except SystemExit as e:  # bench refuses a workload past the context this way
            print(e)
        out = capsys.readouterr()
        return out.out + out.err

    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    assert "UNAUTHENTICATED" in run()
    assert passed in run("--api-key", "key-one")
    monkeypatch.setenv("PDSERVE_API_KEY", "key-two")
    assert passed in run()
    assert "UNAUTHENTICATED" in run("--api-key", "wrong")


def test_the_launcher_secures_the_router_from_the_config(tiny_llama_dir, tls_files, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("# rotated 2026-11\n\nkey-one\n")
    cert, key = (str(p) for p in tls_files)
    config = config_from_dict(
        {
            "model": str(tiny_llama_dir),
            "router": {
                "listen": "127.0.0.1:0",
                "tls_cert": cert,
                "tls_key": key,
                "api_keys_file": str(keys),
            },
        }
    )

    async def scenario() -> None:
        router, port = await start_router(config, Workers())
        target = f"127.0.0.1:{port}"
        try:
            async with AsyncClient(target, api_key="key-one", root_cert=cert) as client:
                assert (await client.status(timeout=10)).model == tiny_llama_dir.name
            async with AsyncClient(target, api_key="key-two", root_cert=cert) as client:
                with pytest.raises(grpc.RpcError) as info:
                    await client.status(timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await router.stop(0.5)

    asyncio.run(scenario())


def test_a_request_id_belongs_to_the_key_that_created_it(start_router):
    running = start_router(api_keys=KEYS)
    running.hold_kv_pool()
    target = running.target
    try:
        with Client(target, api_key=KEYS[0]) as one, Client(target, api_key=KEYS[1]) as two:
            stream = one.generate([5, 6, 7], request_id="r", max_tokens=4, timeout=30)
            running.wait_queued(1)
            with pytest.raises(grpc.RpcError) as info:
                two.abort("r", timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # the same id under another key is another request, not ALREADY_EXISTS
            theirs = two.generate([5, 6, 7], request_id="r", max_tokens=4, timeout=30)
            running.wait_queued(2)
            one.abort("r", timeout=10)
            assert [r.finish_reason for r in stream][-1] == "abort"
            assert running.router.num_queued == 1  # key two's request still waits
            two.abort("r", timeout=10)
            assert [r.finish_reason for r in theirs][-1] == "abort"
    finally:
        running.stop()


def test_another_key_cannot_resume_a_finished_request(start_router):
    running = start_router(api_keys=KEYS)
    running.hold_kv_pool()
    try:
        with Client(running.target, api_key=KEYS[0]) as one:
            stream = one.generate([5, 6, 7], request_id="mine", max_tokens=4, timeout=30)
            running.wait_queued(1)
            one.abort("mine", timeout=10)
            assert [r.finish_reason for r in stream][-1] == "abort"
            resumed = one.generate(None, resume_from="mine", max_tokens=4, timeout=30)
            running.wait_queued(1)  # its owner continues it (it queues for blocks)
            resumed.cancel()
        with Client(running.target, api_key=KEYS[1]) as two, pytest.raises(grpc.RpcError) as info:
            two.complete(None, resume_from="mine", timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "mine" in info.value.details()
    finally:
        running.stop()
