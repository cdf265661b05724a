"""A checkpoint's own Python code runs only when the user allows it (load_backbone's
trust_remote_code, the CLI's --trust-remote-code).

The checkpoint is a tiny random LLaVA-OneVision (tests/llava_tiny.py) whose configs name a
module in the folder through `auto_map`, as hub repos with custom code do; importing that
module writes a marker file, so "the code ran" is observed, not inferred.
"""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.backbone import load_backbone
from tests.llava_tiny import save_tiny_llava

CUSTOM_CODE = '''
from pathlib import Path

Path({marker!r}).write_text("custom code ran")

from transformers import LlavaOnevisionConfig, PreTrainedTokenizerFast


class CustomConfig(LlavaOnevisionConfig):
    pass


class CustomTokenizer(PreTrainedTokenizerFast):
    pass
'''


def checkpoint_with_code(folder: Path, marker: Path, tokenizer_needs_code: bool) -> Path:
    """save_tiny_llava + custom_code.py named by auto_map in config.json and tokenizer_config.json.
    tokenizer_needs_code: the tokenizer class exists only in that module (no built-in fallback)."""
    ck = save_tiny_llava(folder)
    (ck / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((ck / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_code.CustomConfig"}
    (ck / "config.json").write_text(json.dumps(config))
    tok = json.loads((ck / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "custom_code.CustomTokenizer"]}
    if tokenizer_needs_code:
        tok["tokenizer_class"] = "CustomTokenizer"
    (ck / "tokenizer_config.json").write_text(json.dumps(tok))
    return ck


@pytest.fixture
def no_prompt(monkeypatch):
    """Fails the test if anything asks on stdin (transformers does when trust_remote_code is unset)."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    yield asked
    assert asked == [], f"asked on stdin: {asked}"


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies trusted code into HF_MODULES_CACHE and imports it from there:
    keep that in tmp_path and forget the imported modules afterwards."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def frames(n=2, size=32):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_checkpoint_code_is_not_run_by_default(tmp_path, no_prompt, modules_cache):
    marker = tmp_path / "marker"
    ck = checkpoint_with_code(tmp_path / "ck", marker, tokenizer_needs_code=False)
    bb = load_backbone(str(ck), device="cpu")
    assert not marker.exists()
    assert type(bb.tokenizer).__module__.startswith("transformers.")
    assert type(bb.vlm.config).__module__.startswith("transformers.")
    emb = bb.embed_frames(frames(), [0.5, 1.5], 2.0)  # the built-in classes load a working model
    assert emb.shape == (2, bb.n0, bb.decoder.config.hidden_size) and torch.isfinite(emb).all()


def test_checkpoint_that_needs_its_code_is_refused_with_the_flag_named(tmp_path, no_prompt, modules_cache):
    marker = tmp_path / "marker"
    ck = checkpoint_with_code(tmp_path / "ck", marker, tokenizer_needs_code=True)
    with pytest.raises(ValueError, match=r"needs to run Python code it ships.*--trust-remote-code") as err:
        load_backbone(str(ck), device="cpu")
    assert str(ck) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("tokenizer_needs_code", [False, True])
def test_trust_remote_code_runs_the_checkpoint_code(tmp_path, no_prompt, modules_cache, tokenizer_needs_code):
    marker = tmp_path / "marker"
    ck = checkpoint_with_code(tmp_path / "ck", marker, tokenizer_needs_code=tokenizer_needs_code)
    bb = load_backbone(str(ck), device="cpu", trust_remote_code=True)
    assert marker.read_text() == "custom code ran"
    assert type(bb.tokenizer).__name__ == "CustomTokenizer"
    ids, mask = bb.question_ids("what colour is the star ?")
    assert mask.sum() == 6 and len(ids) > 6  # what colour is the star ?  (a working tokenizer)


def test_the_cli_flag_reaches_the_ingest_config():
    from jobs.cli import build_parser, ingest_config

    parse = build_parser().parse_args
    assert ingest_config(parse(["ingest", "src", "--index", "i", "--trust-remote-code"])).trust_remote_code is True
    assert ingest_config(parse(["ingest", "src", "--index", "i"])).trust_remote_code is False
    assert parse(["ask", "i", "q", "--trust-remote-code"]).trust_remote_code is True
