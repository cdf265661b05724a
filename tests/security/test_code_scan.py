"""framekv's code has no path from stored or user bytes to running code (tests/security/codescan.py),
and the scan is shown to find every pattern it looks for, through aliases, at the right line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.security.codescan import SCANNED_DIRS, python_files, scan_source, scan_tree

REPO = Path(__file__).resolve().parents[2]

# (snippet, rule expected on its last line)
UNSAFE = [
    ("import pickle\npickle.loads(blob)", "unpickle"),
    ("import pickle\nwith open(p, 'rb') as f:\n    pickle.load(f)", "unpickle"),
    ("import pickle as p\np.Unpickler(f).load()", "unpickle"),
    ("from pickle import loads", "unpickle"),
    ("import cPickle\ncPickle.loads(b)", "unpickle"),
    ("import dill\ndill.load(f)", "unpickle"),
    ("import marshal\nmarshal.loads(b)", "unpickle"),
    ("import joblib\njoblib.load(path)", "unpickle"),
    ("import pandas as pd\npd.read_pickle(path)", "unpickle"),
    ("import pickle\nunpack = pickle.loads\nagain = unpack\nagain(b)", "unpickle"),
    ("import pickle\ngetattr(pickle, 'loads')(b)", "unpickle"),
    ("__import__('pickle').loads(b)", "unpickle"),
    ("import importlib\nimportlib.import_module('marshal').loads(b)", "unpickle"),
    ("import torch\ntorch.load(path)", "torch-load"),
    ("import torch\ntorch.load(path, weights_only=False)", "torch-load"),
    ("import torch\ntorch.load(path, weights_only=flag)", "torch-load"),
    ("import torch as t\nt.load(path, map_location='cpu')", "torch-load"),
    ("from torch import load as restore\nrestore(path)", "torch-load"),
    ("import torch.serialization\ntorch.serialization.load(path)", "torch-load"),
    ("from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)", "trust-remote-code"),
    ("kwargs = {'trust_remote_code': True}", "trust-remote-code"),
    ("kwargs = dict(trust_remote_code=1)", "trust-remote-code"),
    ("def load(spec, trust_remote_code=True): pass", "trust-remote-code"),
    ("def load(spec, *, trust_remote_code=True): pass", "trust-remote-code"),
    ("load = lambda spec, trust_remote_code='yes': spec", "trust-remote-code"),
    ("cfg.trust_remote_code = True", "trust-remote-code"),
    ("from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained(p)", "implicit-remote"),
    ("import transformers\ntransformers.AutoConfig.from_pretrained(p)", "implicit-remote"),
    ("from transformers import pipeline\npipeline('text-generation', model=p)", "implicit-remote"),
    ("import subprocess\nsubprocess.run(cmd, shell=True)", "shell"),
    ("import subprocess as sp\nsp.Popen(cmd, shell=use_shell)", "shell"),
    ("from subprocess import check_output\ncheck_output(cmd, shell=1)", "shell"),
    ("import os\nos.system('ffmpeg -i ' + name)", "shell"),
    ("import os\nos.popen(cmd)", "shell"),
    ("eval(text)", "eval-exec"),
    ("exec(compile(src, 'x', 'exec'))", "eval-exec"),
    ("import builtins\nbuiltins.eval(line)", "eval-exec"),
    ("import yaml\nyaml.load(text)", "yaml-load"),
    ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "yaml-load"),
    ("import yaml\nyaml.load(text, yaml.FullLoader)", "yaml-load"),
    ("import yaml\nyaml.unsafe_load(text)", "yaml-load"),
    ("import yaml\nyaml.full_load(text)", "yaml-load"),
    ("import numpy as np\nnp.load(path, allow_pickle=True)", "np-allow-pickle"),
    ("from numpy import load\nload(path, allow_pickle=allow)", "np-allow-pickle"),
    ("import numpy\nnumpy.load(path, mmap_mode='r', allow_pickle=True)", "np-allow-pickle"),
    ("import boto3\nboto3.set_stream_logger('')", "debug-logging"),
    ("import botocore.session\nbotocore.session.get_session().set_debug_logger()", "debug-logging"),
    ("import logging\nlogging.basicConfig(level=logging.DEBUG)", "debug-logging"),
    ("import logging as lg\nlg.getLogger('botocore.endpoint').setLevel(lg.DEBUG)", "debug-logging"),
    ("from logging import getLogger\ngetLogger('boto3').setLevel('DEBUG')", "debug-logging"),
]

SAFE = '''
"""Docstrings mention pickle.loads(blob), torch.load(p) and trust_remote_code=True: text, not code."""
import logging
import pickle
import subprocess

import numpy as np
import torch
import yaml
from transformers import AutoTokenizer

# pickle.loads(blob); eval(text); subprocess.run(cmd, shell=True)   <- a comment
blob = pickle.dumps({"a": 1})            # writing is not loading
torch.load(path, weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.load(text, yaml.CSafeLoader)
np.load(path)
np.load(path, allow_pickle=False)
subprocess.run(["ffmpeg", "-i", path], shell=False)
subprocess.run(["ffprobe", path], check=True)
model.eval()
eval("1 + 1")
AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
AutoTokenizer.from_pretrained(path, trust_remote_code=False)
message = "trust_remote_code=True"
logging.getLogger("ray.data").setLevel(logging.WARNING)
logging.getLogger("botocore").setLevel(logging.WARNING)
logging.basicConfig(level=logging.INFO)


def load(spec, trust_remote_code: bool = False):
    return spec
'''


@pytest.mark.parametrize("snippet,rule", UNSAFE, ids=[f"{r}-{i}" for i, (_, r) in enumerate(UNSAFE)])
def test_scanner_finds_each_pattern_at_its_line(snippet, rule):
    findings = scan_source(snippet, "snippet.py")
    last = len(snippet.splitlines())
    assert [(f.rule, f.line) for f in findings if f.rule == rule] == [(rule, last)], findings
    assert str(findings[0]).startswith(f"snippet.py:{findings[0].line}: {findings[0].rule}: ")


def test_safe_forms_comments_and_docstrings_are_not_findings():
    assert scan_source(textwrap.dedent(SAFE), "safe.py") == []


def test_unparsable_file_is_a_finding():
    assert [f.rule for f in scan_source("def broken(:\n", "broken.py")] == ["unparsable"]


def test_framekv_code_has_no_unsafe_patterns():
    files = {p.relative_to(REPO).as_posix() for p in python_files(REPO)}
    # the scan sees the code that loads models, reads objects and runs commands
    assert {"model/backbone.py", "pipeline/store.py", "pipeline/ingest.py", "jobs/cli.py", "bench/ingest.py"} <= files
    assert {f.split("/")[0] for f in files} == set(SCANNED_DIRS)
    findings = scan_tree(REPO)
    assert not findings, "unsafe patterns:\n" + "\n".join(map(str, findings))
