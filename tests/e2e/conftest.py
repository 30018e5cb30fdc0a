"""One running cluster (Ray, 1 prefill + 1 decode worker, the router with its gRPC port and its
HTTP door) shared by the e2e tests: each start costs 10-20 s."""

from __future__ import annotations

import pytest

from pdserve.cluster.config import config_from_dict


@pytest.fixture(scope="session")
def cluster_config(tiny_llama_dir):
    return config_from_dict(
        {
            "model": str(tiny_llama_dir),
            "dtype": "float32",
            "kv_cache": {"num_blocks": 256},
            "prefill": {"token_budget": 256},
            "kv_transfer": {"timeout_s": 5},
            # NOTE: 0 keeps every prompt that the decode worker does not hold whole on the
            # prefill worker, so these tests exercise the KV transfer.
            "router": {
                "listen": "127.0.0.1:0",
                "openai_listen": "127.0.0.1:0",
                "local_prefill_max_tokens": 0,
            },
        }
    )


@pytest.fixture(scope="session")
def cluster(cluster_config):
    import ray

    from pdserve.cluster.launcher import BackgroundCluster

    running = BackgroundCluster(cluster_config).start()
    yield running
    running.stop()
    ray.shutdown()


@pytest.fixture()
def client(cluster):
    from pdserve.api.client import Client

    with Client(cluster.target) as c:
        yield c
