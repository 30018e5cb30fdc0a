"""The cluster YAML: defaults for every key but `model`, errors that name the key."""

from __future__ import annotations

import importlib.resources

import pytest

from pdserve.cluster.config import (
    ClusterConfig,
    ConfigError,
    config_from_dict,
    load_config,
    read_api_keys,
)


def test_prefix_caching_is_on_by_default_and_reaches_every_worker_engine():
    from pdserve.cluster.launcher import _engine_config

    on, off = (
        config_from_dict({"model": "m"}),
        config_from_dict({"model": "m", "prefix_caching": False}),
    )
    for role in ("prefill", "decode"):
        assert _engine_config(on, role).enable_prefix_cache
        assert not _engine_config(off, role).enable_prefix_cache


def test_only_model_is_required_and_everything_else_has_a_default():
    config = config_from_dict({"model": "m"})
    assert config == ClusterConfig(model="m")
    assert (config.prefill.workers, config.decode.workers, config.router.policy) == (
        1,
        1,
        "cache_aware",
    )
    assert (config.router.request_table_size, config.router.request_table_ttl_s) == (10_000, 600)
    with pytest.raises(ConfigError, match="^model: required"):
        config_from_dict({})


def test_the_embedded_local_config_is_package_data_and_names_no_model():
    embedded = importlib.resources.files("pdserve.deploy").joinpath("local.yaml")
    with importlib.resources.as_file(embedded) as path:
        with pytest.raises(ConfigError, match="^model: required"):
            load_config(path)
        config = load_config(path, {"model": "/m"})
    assert config.device == "cpu" and config.kv_cache.num_blocks == 512


def test_file_paths_in_a_yaml_start_at_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "keys").write_text("key-one\n")
    (folder / "cluster.yaml").write_text("model: models/m\nrouter:\n  api_keys_file: keys\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(folder / "cluster.yaml")
    assert config.model == str(folder / "models" / "m")
    assert config.router.api_keys_file == str(folder / "keys")


def test_overrides_win_over_yaml_keys_and_start_at_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "cluster.yaml").write_text("model: m\ndtype: float32\nprefill:\n  tp: 1\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(
        tmp_path / "cluster.yaml",
        {"model": "other", "dtype": "bfloat16", "prefill": {"workers": 3}},
    )
    assert (config.model, config.dtype) == (str(tmp_path / "other"), "bfloat16")
    assert (config.prefill.workers, config.prefill.tp) == (3, 1)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"modle": "m"}, "modle"),
        ({"prefill": {"wokers": 2}}, "prefill.wokers"),
        ({"kv_cache": {"num_blocks": "many"}}, "kv_cache.num_blocks"),
        ({"kv_transfer": {"timeout_s": 0}}, "kv_transfer.timeout_s"),
        ({"router": {"policy": "random"}}, "router.policy"),
        ({"router": {"listen": "nohost"}}, "router.listen"),
        ({"router": {"openai_listen": "8000"}}, "router.openai_listen"),
        ({"router": {"metrics_listen": "host:"}}, "router.metrics_listen"),
        (
            {"router": {"openai_listen": "127.0.0.1:8000", "metrics_listen": "127.0.0.1:9000"}},
            "router.metrics_listen",
        ),
        ({"router": {"cache_weight": -1}}, "router.cache_weight"),
        ({"router": {"local_prefill_max_tokens": -1}}, "router.local_prefill_max_tokens"),
        ({"router": {"request_table_size": 0}}, "router.request_table_size"),
        ({"router": {"request_table_ttl_s": 0}}, "router.request_table_ttl_s"),
        ({"decode": {"workers": 0}}, "decode.workers"),
        ({"supervision": {"stall_timeout_s": 1}}, "supervision.stall_timeout_s"),
        ({"decode": {"tp": 0}}, "decode.tp"),
        ({"prefill": {"tp": 0}}, "prefill.tp"),
        ({"dtype": "float8"}, "dtype"),
        ({"prefill": 3}, "prefill"),
        ({"threads_per_worker": True}, "threads_per_worker"),
        ({"prefix_caching": "yes"}, "prefix_caching"),
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


@pytest.fixture
def secrets(tmp_path):
    """Paths by name: PEM-looking cert and key files, API keys files, and one that is missing."""
    files = {
        "cert.pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "key.pem": "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
        "keys": "# one key per line\n\n  key-one  \n# old: key-zero\nkey-two\n",
        "comments": "# nothing yet\n\n",
        "spaced": "key-one\nkey two\n",
        "notes.txt": "not a certificate\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {name: str(tmp_path / name) for name in [*files, "missing"]}


def test_tls_and_api_keys_are_off_by_default():
    router = config_from_dict({"model": "m"}).router
    assert (router.tls_cert, router.tls_key, router.api_keys_file) == (None, None, None)


def test_tls_files_and_an_api_keys_file_load(secrets):
    router = config_from_dict(
        {
            "model": "m",
            "router": {
                "tls_cert": secrets["cert.pem"],
                "tls_key": secrets["key.pem"],
                "api_keys_file": secrets["keys"],
            },
        }
    ).router
    assert (router.tls_cert, router.api_keys_file) == (secrets["cert.pem"], secrets["keys"])
    assert read_api_keys(router.api_keys_file) == ("key-one", "key-two")


@pytest.mark.parametrize(
    ("router", "key", "says"),
    [
        ({"tls_cert": "cert.pem"}, "router.tls_key", "required with router.tls_cert"),
        ({"tls_key": "key.pem"}, "router.tls_cert", "required with router.tls_key"),
        ({"tls_cert": "missing", "tls_key": "key.pem"}, "router.tls_cert", "cannot read"),
        ({"tls_cert": "cert.pem", "tls_key": "missing"}, "router.tls_key", "cannot read"),
        ({"tls_cert": "notes.txt", "tls_key": "key.pem"}, "router.tls_cert", "not PEM"),
        ({"tls_cert": "cert.pem", "tls_key": "cert.pem"}, "router.tls_key", "not PEM"),
        ({"api_keys_file": "missing"}, "router.api_keys_file", "cannot read"),
        ({"api_keys_file": "comments"}, "router.api_keys_file", "holds no key"),
        ({"api_keys_file": "spaced"}, "router.api_keys_file", "line 2"),
    ],
)
def test_bad_tls_or_api_keys_setting_is_named(secrets, router, key, says):
    values = {k: secrets[name] for k, name in router.items()}
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": "m", "router": values})
    assert str(e.value).startswith(f"{key}:") and says in str(e.value)
    assert "key two" not in str(e.value)  # a key never shows in an error


def test_a_secret_in_the_yaml_itself_is_an_unknown_key():
    with pytest.raises(ConfigError, match=r"^router\.api_keys: unknown key"):
        config_from_dict({"model": "m", "router": {"api_keys": ["key-one"]}})
