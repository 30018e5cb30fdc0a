"""The cluster YAML: defaults for every key but `model`, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.cluster.config import ClusterConfig, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_only_model_is_required_and_everything_else_has_a_default():
    config = config_from_dict({"model": "m"})
    assert config == ClusterConfig(model="m")
    assert (config.prefill.workers, config.decode.workers, config.router.policy) == (
        1,
        1,
        "least_loaded",
    )
    with pytest.raises(ConfigError, match="^model: required"):
        config_from_dict({})


def test_the_embedded_local_config_loads(tmp_path):
    config = load_config(ROOT / "deploy" / "local.yaml")
    assert config.device == "cpu" and config.kv_cache.num_blocks == 512


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"modle": "m"}, "modle"),
        ({"prefill": {"wokers": 2}}, "prefill.wokers"),
        ({"kv_cache": {"num_blocks": "many"}}, "kv_cache.num_blocks"),
        ({"kv_transfer": {"timeout_s": 0}}, "kv_transfer.timeout_s"),
        ({"router": {"policy": "random"}}, "router.policy"),
        ({"router": {"listen": "nohost"}}, "router.listen"),
        ({"decode": {"workers": 0}}, "decode.workers"),
        ({"decode": {"tp": 2}}, "decode.tp"),
        ({"dtype": "float8"}, "dtype"),
        ({"prefill": 3}, "prefill"),
        ({"threads_per_worker": True}, "threads_per_worker"),
    ],
)
def test_bad_key_or_value_is_named(values, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": "m", **values})
    assert str(e.value).startswith(f"{key}:")


def test_missing_or_malformed_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
