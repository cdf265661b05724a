"""The VLM interface LP-Comp and question answering need, and `load_backbone`.

    bb = load_backbone("tiny")                      # shipped checkpoint (model/checkpoints/tiny)
    bb = load_backbone("/models/llava-ov-0.5b")     # a local dir: family from its config.json
    bb = load_backbone("org/name")                  # hub id: the hub, or its cache under HF_HUB_OFFLINE=1
    embs = bb.embed_frames(frames_uint8, times, duration)   # [F, n0, D]
    ids = bb.prefix_ids(); q_ids, q_mask = bb.question_ids("what colour is the star?")

Device and dtype are chosen at run time: CUDA + bf16 when available, else CPU fp32.
Families (`FAMILIES`, keyed by config.json's model_type): `tiny` (model/tiny.py),
`llava_onevision` (model/families/llava_onevision.py), `qwen2_5_vl`
(model/families/qwen2_5_vl.py) and `qwen3_vl` (model/families/qwen3_vl.py), each run as
transformers runs a video (docs/MODELS.md).

Positions: a 1-D family gives each token one index, and LP-Comp renumbers the kept
tokens 0..len-1 after every drop. A `rope_3d` family (Qwen2.5-VL's M-RoPE) gives every
frame token a (t, h, w) id from `frame_positions` and text one id on all three axes;
ids are coordinates, so kept tokens keep theirs (model/positions.py). A frame unit may
carry text (Qwen3-VL: its timestamp, vision_start and vision_end in `unit_text` slots that
LP-Comp never drops, padded to a fixed n0: `unit_valid`) and DeepStack maps
(`deepstack_layers`, behind the embeddings that `embed_frames` returns).

A checkpoint's own Python code (`auto_map` in its configs) runs only with
`load_backbone(spec, trust_remote_code=True)`, which only the user's `--trust-remote-code`
flag may set; without it the built-in classes load the checkpoint, or an error says the
code is needed. The flag is passed to every transformers call explicitly: left unset,
transformers asks on stdin whether to run such code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.retrieval import attach_head, load_head

TINY_DIR = Path(__file__).parent / "checkpoints" / "tiny"
SHIPPED = {"tiny": TINY_DIR, "tiny-vst": TINY_DIR.with_name("tiny-vst")}  # names of the shipped checkpoints
VIDEO_MARK, QUESTION_MARK = "\x00VIDEO\x00", "\x00QUESTION\x00"


def pick_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 if available, else CPU fp32 (the tested path)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def dir_revision(path: Path) -> str:
    """Content hash of a checkpoint directory's config and weights: retraining changes it."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def frame_units(values, unit: int) -> np.ndarray:
    """Per decoded frame values [F] -> per frame unit [ceil(F / unit), unit], the last
    frame repeated to fill the last unit (as the Qwen processors fill a tubelet)."""
    values = np.asarray(values)
    pad = -len(values) % unit
    return np.concatenate([values, np.repeat(values[-1:], pad)]).reshape(-1, unit)


class Backbone(nn.Module):
    """What the rest of framekv needs from a VLM (docs/ARCHITECTURE.md)."""

    model_id: str
    revision: str
    n0: int  # visual tokens per frame
    image_size: tuple[int, int]  # (H, W) frames are decoded at
    decoder: nn.Module  # Qwen2Model-like: .layers, .rotary_emb, .norm, .embed_tokens, .config
    lm_head: nn.Linear
    tokenizer: object  # PreTrainedTokenizerFast
    retrieval = None  # model/retrieval.py RetrievalHead shipped with the checkpoint, if any

    frame_unit: int = 1  # decoded frames per cached frame (Qwen2.5-VL: 2, a tubelet)
    rope_3d: bool = False  # (t, h, w) position ids per token (M-RoPE), else one index
    # (lead, tail): text slots at the start and end of each frame unit's n0 (Qwen3-VL's
    # timestamp + vision_start, vision_end); LP-Comp never drops them
    unit_text: tuple[int, int] = (0, 0)
    deepstack_layers: int = 0  # visual feature maps added to the frame tokens after layers 0.. (Qwen3-VL)

    def unit_times(self, times) -> np.ndarray:
        """Timestamps [F] of decoded frames -> of the cached frame units [ceil(F / frame_unit)]:
        each unit's first frame."""
        return np.asarray(times, dtype=np.float64)[:: self.frame_unit]

    def frame_positions(self, times: Tensor) -> Tensor:
        """rope_3d families: cached frames' times [F] -> (t, h, w) ids [F, n0, 3] of their
        tokens, counted from the first video token (which sits right after the prefix)."""
        raise NotImplementedError(f"{type(self).__name__} has 1-D positions")

    def text_offset(self, times: Tensor | None = None) -> int:
        """rope_3d families: the first text token after the frame units at `times` [T] sits
        at P + this id."""
        raise NotImplementedError(f"{type(self).__name__} has 1-D positions")

    def unit_valid(self, times: Tensor) -> Tensor | None:
        """Which of each frame unit's n0 slots are tokens [T, n0] bool (False: padding that
        attention skips); None: all of them."""
        return None

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def embed_frames(self, frames, times, duration: float) -> Tensor:
        """frames uint8 [F, H, W, 3] RGB, times [F] seconds -> [F, n0, D]."""
        raise NotImplementedError

    def prefix_ids(self) -> Tensor:
        """Template token ids before the video [P]."""
        raise NotImplementedError

    def question_ids(self, question: str) -> tuple[Tensor, Tensor]:
        """Template after the video: ids [Q] and a mask [Q] marking the user's words."""
        raise NotImplementedError

    def embed_ids(self, ids: Tensor) -> Tensor:
        return self.decoder.embed_tokens(ids.to(self.device))

    def check_frames(self, frames, times) -> tuple[Tensor, Tensor]:
        """Validate and move frames/times: -> uint8 [F, H, W, 3], float64 [F] on device."""
        frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, Tensor) else frames)
        h, w = self.image_size
        if frames.dtype != torch.uint8 or frames.dim() != 4 or tuple(frames.shape[1:]) != (h, w, 3):
            raise ValueError(
                f"frames must be uint8 [F, {h}, {w}, 3] RGB for {self.model_id}, "
                f"got {frames.dtype} {tuple(frames.shape)}"
            )
        times = torch.as_tensor(np.asarray(times, dtype=np.float64))
        if times.shape != (frames.shape[0],):
            raise ValueError(f"times must have one entry per frame ({frames.shape[0]}), got shape {tuple(times.shape)}")
        return frames.to(self.device), times.to(self.device)


class VLMBackbone(Backbone):
    """A transformers VLM (its language model at `model.model.language_model`) whose
    prompt is its chat template's text: `_prefix` before the video, `_before` and
    `_after` around the question (set by the family), tokenised without special tokens;
    `_lead_ids` are ids a family places first in the question part. `preprocess`: the
    family's written-out processor steps."""

    _prefix: str
    _before: str
    _after: str

    def __init__(self, model, tokenizer, model_id: str, revision: str, preprocess):
        super().__init__()
        self.vlm = model
        self.decoder = model.model.language_model
        self.lm_head = model.lm_head
        self.tokenizer = tokenizer
        self.model_id, self.revision, self.preprocess = model_id, revision, preprocess

    def _ids(self, text: str) -> Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def _lead_ids(self) -> Tensor:
        return torch.zeros(0, dtype=torch.long)

    def prefix_ids(self) -> Tensor:
        return self._ids(self._prefix)

    def question_ids(self, question: str) -> tuple[Tensor, Tensor]:
        """[lead | template | words | template]; the mask marks the words."""
        if not question.strip():
            raise ValueError("question is empty")
        parts = [self._lead_ids(), self._ids(self._before), self._ids(question.strip()), self._ids(self._after)]
        mask = torch.cat([torch.full((len(p),), i == 2, dtype=torch.bool) for i, p in enumerate(parts)])
        return torch.cat(parts), mask


def question_template(tokenizer) -> tuple[str, str, str]:
    """(prefix, before-question, after-question) text of the checkpoint's chat template.

    Renders the chat template around markers and splits at them. Tokenizer templates
    take string content; processor templates (LLaVA's chat_template.json) take a list
    of typed items and print "<video>" themselves. A plain Qwen-style template is the
    fallback when neither renders.
    """
    attempts = [
        (f"{VIDEO_MARK}\n{QUESTION_MARK}", VIDEO_MARK),
        ([{"type": "video"}, {"type": "text", "text": QUESTION_MARK}], "<video>"),
    ]
    for content, video in attempts if getattr(tokenizer, "chat_template", None) else []:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        except Exception:  # jinja errors: the template expects the other content format
            continue
        if text.count(video) == 1 and text.count(QUESTION_MARK) == 1:
            prefix, rest = text.split(video)
            before, after = rest.split(QUESTION_MARK)
            return prefix, before, after
    return "<|im_start|>user\n", "\n", "<|im_end|>\n<|im_start|>assistant\n"


@contextmanager
def remote_code_refused(spec: str, trust_remote_code: bool):
    """transformers' refusal of a checkpoint's own code, re-raised naming the way to allow it."""
    try:
        yield
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise ValueError(f"model {spec!r} needs to run Python code it ships (auto_map in its configs), which is "
                         "not allowed by default; read that code, then pass --trust-remote-code "
                         "(load_backbone(..., trust_remote_code=True)) to run it") from None


# Files transformers' processors read and `save_pretrained` of a model or tokenizer does
# not write: a checkpoint copied or retrained (model/train.py) takes them along.
PROCESSOR_FILES = ("chat_template.json", "chat_template.jinja", "processor_config.json",
                   "video_preprocessor_config.json", "preprocessor_config.json")
VIDEO_PROCESSOR_FILES = ("video_preprocessor_config.json", "processor_config.json", "preprocessor_config.json")


def checkpoint_file(spec: str, name: str, required: bool = True) -> Path | None:
    """The file `name` of a checkpoint: in its directory, or for a hub id through
    huggingface_hub's cache (transformers' cached_file: downloads where a hub is
    reachable, only the cache under HF_HUB_OFFLINE=1). None (or, if required, an error
    naming the checkpoint and the file) when it has none."""
    path = Path(spec)
    if path.is_dir():
        found = path / name if (path / name).is_file() else None
    else:
        from transformers.utils import cached_file

        found = cached_file(spec, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        found = Path(found) if found is not None else None
    if found is None and required:
        where = "in its directory" if path.is_dir() else "on the hub or in the hub cache"
        raise ValueError(f"model {spec!r} has no {name} ({where})")
    return found


def require_hub_files(spec: str) -> None:
    """A hub checkpoint must bring what a family reads beside its weights, found through the
    hub cache: a chat template (the tokenizer's, or the processor's chat_template.json), a
    video processor config and generation_config.json (its end tokens). transformers would
    otherwise fall back to defaults without a word."""
    def first(names: tuple[str, ...]) -> Path | None:
        return next((f for f in (checkpoint_file(spec, n, required=False) for n in names) if f is not None), None)

    tok_cfg = checkpoint_file(spec, "tokenizer_config.json", required=False)
    in_tokenizer = tok_cfg is not None and bool(json.loads(tok_cfg.read_text()).get("chat_template"))
    if not in_tokenizer and first(("chat_template.jinja", "chat_template.json")) is None:
        raise ValueError(f"model {spec!r} has no chat template: neither tokenizer_config.json's chat_template "
                         "nor chat_template.jinja nor chat_template.json on the hub or in the hub cache")
    if first(VIDEO_PROCESSOR_FILES) is None:
        raise ValueError(f"model {spec!r} has no video processor config: none of {', '.join(VIDEO_PROCESSOR_FILES)} "
                         "on the hub or in the hub cache")
    checkpoint_file(spec, "generation_config.json")


def use_processor_template(tokenizer, path: str) -> None:
    """A processor-level chat template (chat_template.json, as LLaVA and Qwen-VL ship it)
    for a tokenizer that has none of its own; `path` is a directory or a hub id."""
    if getattr(tokenizer, "chat_template", None):
        return
    processor_template = checkpoint_file(path, "chat_template.json", required=False)
    if processor_template is not None:
        tokenizer.chat_template = json.loads(processor_template.read_text()).get("chat_template")


def _load_tiny(path: str, model_id: str, revision: str, device, dtype, trust_remote_code: bool) -> Backbone:
    from model.tiny import TinyVLM

    bb = TinyVLM.load(Path(path), model_id=model_id, revision=revision).to(device).eval()
    for p in bb.parameters():  # parameters only: rotary/time buffers stay fp32, as in HF
        p.data = p.data.to(dtype)
    return bb


def _import_loader(module: str) -> Callable[..., Backbone]:
    """`module`'s load, imported on first use: loading one family never imports another's."""
    def load(*args):
        return importlib.import_module(module).load(*args)
    return load


# family -> load(path, model_id, revision, device, dtype, trust_remote_code) -> Backbone.
# A family is the `model_type` of a checkpoint's config.json ("family" for framekv's own tiny);
# each lives in one module of model/families/, imported when a checkpoint of it is loaded.
FAMILIES: dict[str, Callable[..., Backbone]] = {
    "tiny": _load_tiny,
    "llava_onevision": _import_loader("model.families.llava_onevision"),
    "qwen2_5_vl": _import_loader("model.families.qwen2_5_vl"),
    "qwen3_vl": _import_loader("model.families.qwen3_vl"),
}


def _family(model_type: str | None, spec: str) -> Callable[..., Backbone]:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model family {model_type!r} for {spec}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def load_backbone(spec: str, device=None, dtype=None, trust_remote_code: bool = False) -> Backbone:
    """A shipped checkpoint ("tiny", "tiny-vst"), a local checkpoint directory, or a hub id
    -> Backbone on device, eval mode.

    trust_remote_code: run Python code the checkpoint ships; only from the user's flag.
    """
    device, dtype = pick_device_dtype(device, dtype)
    path = SHIPPED.get(spec, Path(spec))
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"model directory {path} has no config.json")
        config = json.loads(cfg_file.read_text())
        load = _family("tiny" if config.get("family") == "tiny" else config.get("model_type"), str(path))
        model_id = f"framekv/{spec}" if spec in SHIPPED else str(path.resolve())
        bb = load(str(path), model_id, dir_revision(path), device, dtype, trust_remote_code)
        attach_head(bb, load_head(path, bb.decoder.config.hidden_size))
        return bb
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ValueError(f"model {spec!r} is neither a shipped model ({', '.join(SHIPPED)}), an existing directory, "
                         "nor a hub id (org/name)")
    from transformers import AutoConfig

    with remote_code_refused(spec, trust_remote_code):  # needs a reachable hub (or its local cache)
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    if config.model_type == "tiny":
        raise ValueError(f"model {spec!r}: the tiny family loads only from a local directory")
    load = _family(config.model_type, spec)
    require_hub_files(spec)
    from transformers.utils.hub import extract_commit_hash

    # the snapshot's commit, from where the hub cache resolved config.json (.../snapshots/<commit>/)
    revision = extract_commit_hash(str(checkpoint_file(spec, "config.json")), None) or "main"
    return load(spec, spec, revision, device, dtype, trust_remote_code)
