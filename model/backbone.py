"""The VLM interface LP-Comp and question answering need, and `load_backbone`.

    bb = load_backbone("tiny")                      # shipped checkpoint (model/checkpoints/tiny)
    bb = load_backbone("/models/llava-ov-0.5b")     # a local dir: family from its config.json
    bb = load_backbone("org/name")                  # hub id: only where a hub is reachable
    embs = bb.embed_frames(frames_uint8, times, duration)   # [F, n0, D]
    ids = bb.prefix_ids(); q_ids, q_mask = bb.question_ids("what colour is the star?")

Device and dtype are chosen at run time: CUDA + bf16 when available, else CPU fp32.
Families: `tiny` (model/tiny.py) and `llava_onevision` (LlavaOnevisionForConditionalGeneration,
Qwen2 text decoder; frame patch features are average-pooled to n0 tokens).

A checkpoint's own Python code (`auto_map` in its configs) runs only with
`load_backbone(spec, trust_remote_code=True)`, which only the user's `--trust-remote-code`
flag may set; without it the built-in classes load the checkpoint, or an error says the
code is needed. The flag is passed to every transformers call explicitly: left unset,
transformers asks on stdin whether to run such code.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TINY_DIR = Path(__file__).parent / "checkpoints" / "tiny"
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


class Backbone(nn.Module):
    """What the rest of framekv needs from a VLM (docs/ARCHITECTURE.md)."""

    model_id: str
    revision: str
    n0: int  # visual tokens per frame
    image_size: tuple[int, int]  # (H, W) frames are decoded at
    decoder: nn.Module  # Qwen2Model-like: .layers, .rotary_emb, .norm, .embed_tokens, .config
    lm_head: nn.Linear
    tokenizer: object  # PreTrainedTokenizerFast

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


class LlavaOnevisionBackbone(Backbone):
    """LLaVA-OneVision / LLaVA-Video: SigLIP tower + projector + Qwen2 decoder."""

    def __init__(self, model, tokenizer, model_id: str, revision: str, n0: int = 16,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
        super().__init__()
        grid = math.isqrt(n0)
        if grid * grid != n0:
            raise ValueError(f"n0 must be a square number of tokens per frame, got {n0}")
        self.vlm = model
        self.decoder = model.model.language_model
        self.lm_head = model.lm_head
        self.tokenizer = tokenizer
        self.model_id, self.revision, self.n0, self.grid = model_id, revision, n0, grid
        size = model.config.vision_config.image_size
        self.image_size = (size, size)
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self._prefix, self._before, self._after = question_template(tokenizer)

    def embed_frames(self, frames, times, duration: float) -> Tensor:
        frames, _ = self.check_frames(frames, times)
        cfg = self.vlm.config
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        x = ((x - self.mean) / self.std).to(self.dtype)
        out = self.vlm.model.vision_tower(x, output_hidden_states=True)
        layer = cfg.vision_feature_layer
        layers = [layer] if isinstance(layer, int) else list(layer)
        feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        feats = self.vlm.model.multi_modal_projector(feats)  # [F, patches, D]
        side = math.isqrt(feats.shape[1])
        grid = feats.transpose(1, 2).reshape(feats.shape[0], -1, side, side)
        pooled = F.adaptive_avg_pool2d(grid.float(), self.grid).to(feats.dtype)
        return pooled.flatten(2).transpose(1, 2)  # [F, n0, D], row-major grid order

    def _ids(self, text: str) -> Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def prefix_ids(self) -> Tensor:
        return self._ids(self._prefix)

    def question_ids(self, question: str) -> tuple[Tensor, Tensor]:
        if not question.strip():
            raise ValueError("question is empty")
        parts = [self._ids(self._before), self._ids(question.strip()), self._ids(self._after)]
        mask = torch.cat([torch.zeros(len(parts[0]), dtype=torch.bool), torch.ones(len(parts[1]), dtype=torch.bool),
                          torch.zeros(len(parts[2]), dtype=torch.bool)])
        return torch.cat(parts), mask


@contextmanager
def _remote_code_refused(spec: str, trust_remote_code: bool):
    """transformers' refusal of a checkpoint's own code, re-raised naming the way to allow it."""
    try:
        yield
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise ValueError(f"model {spec!r} needs to run Python code it ships (auto_map in its configs), which is "
                         "not allowed by default; read that code, then pass --trust-remote-code "
                         "(load_backbone(..., trust_remote_code=True)) to run it") from None


def _load_llava_onevision(path: str, model_id: str, revision: str, device, dtype,
                          trust_remote_code: bool) -> LlavaOnevisionBackbone:
    """Weights always go into transformers' own LLaVA-OneVision class; a checkpoint's code
    can only be reached through its tokenizer/config `auto_map`, with trust_remote_code."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    with _remote_code_refused(path, trust_remote_code):
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor_template = Path(path) / "chat_template.json"
    if not getattr(tokenizer, "chat_template", None) and processor_template.is_file():
        tokenizer.chat_template = json.loads(processor_template.read_text()).get("chat_template")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # SigLIP defaults
    pre = Path(path) / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    return LlavaOnevisionBackbone(model, tokenizer, model_id, revision, image_mean=mean, image_std=std).to(device)


def _family(config: dict) -> str:
    if config.get("family") == "tiny":
        return "tiny"
    if config.get("model_type") == "llava_onevision":
        return "llava_onevision"
    raise ValueError(f"unsupported model family {config.get('model_type') or config.get('family')!r}; "
                     "supported: tiny, llava_onevision")


def load_backbone(spec: str, device=None, dtype=None, trust_remote_code: bool = False) -> Backbone:
    """"tiny", a local checkpoint directory, or a hub id -> Backbone on device, eval mode.

    trust_remote_code: run Python code the checkpoint ships; only from the user's flag.
    """
    device, dtype = pick_device_dtype(device, dtype)
    path = TINY_DIR if spec == "tiny" else Path(spec)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"model directory {path} has no config.json")
        family = _family(json.loads(cfg_file.read_text()))
        revision = dir_revision(path)
        model_id = "framekv/tiny" if spec == "tiny" else str(path.resolve())
        if family == "tiny":
            from model.tiny import TinyVLM

            bb = TinyVLM.load(path, model_id=model_id, revision=revision).to(device).eval()
            for p in bb.parameters():  # parameters only: rotary/time buffers stay fp32, as in HF
                p.data = p.data.to(dtype)
            return bb
        return _load_llava_onevision(str(path), model_id, revision, device, dtype, trust_remote_code)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ValueError(f"model {spec!r} is neither 'tiny', an existing directory, nor a hub id (org/name)")
    from transformers import AutoConfig

    with _remote_code_refused(spec, trust_remote_code):  # needs a reachable hub (or its local cache)
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    if config.model_type != "llava_onevision":
        raise ValueError(f"unsupported model family {config.model_type!r} for {spec}; supported: llava_onevision")
    revision = getattr(config, "_commit_hash", None) or "main"
    return _load_llava_onevision(spec, spec, revision, device, dtype, trust_remote_code)
