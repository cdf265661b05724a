"""`load_backbone("org/name")` through huggingface_hub's cache: a fake hub cache (HF_HUB_CACHE
in a tmp dir, the hub's layout models--org--name/snapshots/<commit>/..., refs/main) holds
reduced random checkpoints of each family; with HF_HUB_OFFLINE=1 they load as from their
directories, the chat template, video processor config and generation config found in the
cache (not at a path relative to the working directory), and a missing one is an error
naming the repo and the file. A fresh interpreter runs the loads: huggingface_hub reads
HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.backbone import load_backbone
from model.generate import end_token_ids
from tests.llava_tiny import save_tiny_llava
from tests.qwen2_5_vl_tiny import save_tiny_qwen2_5_vl

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
QUESTION = "what colour is the star ?"
PROBE = """
import json, sys
import torch
from model.backbone import load_backbone
from model.generate import end_token_ids
out = {}
for repo in sys.argv[1:]:
    try:
        bb = load_backbone(repo)
    except ValueError as e:
        out[repo] = {"error": str(e)}
        continue
    q, m = bb.question_ids(%r)
    out[repo] = {"model_id": bb.model_id, "revision": bb.revision, "type": type(bb).__name__, "n0": bb.n0,
                 "prefix": bb.prefix_ids().tolist(), "question": q.tolist(), "ends": sorted(end_token_ids(bb)),
                 "weights": float(sum(p.detach().double().sum() for p in bb.parameters()))}
print(json.dumps(out))
""" % QUESTION


def hub_snapshot(cache: Path, repo: str, save) -> Path:
    """Write a checkpoint where the hub cache keeps repo's main revision."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return save(root / "snapshots" / COMMIT)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, dict]:
    """(cache, what a fresh offline interpreter loads for each repo)."""
    cache = tmp_path_factory.mktemp("hub")
    for repo, save, drop in [("org/llava", save_tiny_llava, None), ("org/qwen", save_tiny_qwen2_5_vl, None),
                             ("org/qwen-nogen", save_tiny_qwen2_5_vl, "generation_config.json"),
                             ("org/qwen-notemplate", save_tiny_qwen2_5_vl, "chat_template.json"),
                             ("org/llava-novideo", save_tiny_llava, "video_preprocessor_config.json")]:
        snap = hub_snapshot(cache, repo, save)
        if drop:
            (snap / drop).unlink()
    cwd = tmp_path_factory.mktemp("cwd")  # nothing at ./org/name: a relative-path lookup finds nothing
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HOME", None)
    run = subprocess.run([sys.executable, "-c", PROBE, "org/llava", "org/qwen", "org/qwen-nogen",
                          "org/qwen-notemplate", "org/llava-novideo"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return cache, json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("repo", ["org/llava", "org/qwen"])
def test_hub_id_loads_from_the_cache_as_its_directory(hub, repo):
    """Same backbone as from the snapshot directory (Qwen2.5-VL's template is only in the
    repo's chat_template.json, so its prompt proves the file was read from the cache), and
    the repo id and commit recorded as model_id and revision."""
    cache, loaded = hub
    got = loaded[repo]
    assert "error" not in got, got
    assert got["model_id"] == repo and got["revision"] == COMMIT
    snap = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT
    ref = load_backbone(str(snap))
    q, _ = ref.question_ids(QUESTION)
    assert got["type"] == type(ref).__name__ and got["n0"] == ref.n0
    assert got["prefix"] == ref.prefix_ids().tolist() and got["question"] == q.tolist()
    assert got["ends"] == sorted(end_token_ids(ref))
    assert got["weights"] == float(sum(p.detach().double().sum() for p in ref.parameters()))


@pytest.mark.parametrize("repo, missing", [("org/qwen-nogen", "generation_config.json"),
                                           ("org/qwen-notemplate", "chat template"),
                                           ("org/llava-novideo", "video processor config")])
def test_missing_hub_file_is_an_error_naming_repo_and_file(hub, repo, missing):
    _, loaded = hub
    err = loaded[repo].get("error", "")
    assert repr(repo) in err and missing in err, loaded[repo]
