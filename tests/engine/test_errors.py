"""Bad requests and broken model folders fail with errors that name the field, file or key."""

from __future__ import annotations

import json
import shutil

import pytest
from engine_helpers import make_engine

from pdserve.api.errors import InvalidRequest, ModelLoadError
from pdserve.api.sampling import SamplingParams
from pdserve.engine.config import ModelConfig


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, num_blocks=64)


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ([], "prompt_token_ids"),
        ([1, 2, 1000], "prompt_token_ids[2]"),
        ([-1], "prompt_token_ids[0]"),
        ([1] * 5000, "prompt"),
    ],
)
def test_bad_prompt_names_the_field(engine, prompt, field):
    with pytest.raises(InvalidRequest) as e:
        engine.add_request("bad", prompt, SamplingParams())
    assert e.value.field == field
    assert not engine.has_unfinished()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_model_file_is_named(tiny_llama_dir, tmp_path, missing):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    (d / missing).unlink()
    with pytest.raises(ModelLoadError, match=missing):
        make_engine(d)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda c: c.pop("hidden_size"), "hidden_size"),
        (
            lambda c: c.update(
                rope_scaling={"rope_type": "yarn", "factor": 2.0}, rope_parameters=None
            ),
            "rope_scaling.rope_type",
        ),
        (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "architectures"),
        (lambda c: c.update(sliding_window=128, use_sliding_window=True), "sliding_window"),
    ],
)
def test_malformed_or_unservable_config_names_the_key(tiny_llama_dir, tmp_path, edit, key):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        ModelConfig.from_model_dir(d)


def test_missing_tensor_is_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_llama_dir, tmp_path / "m")
    weights = load_file(d / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight"):
        make_engine(d)


def test_sharded_checkpoint_loads_like_a_single_file(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_llama_dir, tmp_path / "m")
    weights = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, d / file)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    prompt = [5, 6, 7, 8]
    from engine_helpers import generate

    assert generate(make_engine(d), [prompt]) == generate(make_engine(tiny_llama_dir), [prompt])
