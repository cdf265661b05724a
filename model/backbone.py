"""The VLM interface LP-Comp and question answering need, and `load_backbone`.

    bb = load_backbone("tiny")                      # shipped checkpoint (model/checkpoints/tiny)
    bb = load_backbone("/models/llava-ov-0.5b")     # a local dir: family from its config.json
    bb = load_backbone("org/name")                  # hub id: only where a hub is reachable
    embs = bb.embed_frames(frames_uint8, times, duration)   # [F, n0, D]
    ids = bb.prefix_ids(); q_ids, q_mask = bb.question_ids("what colour is the star?")

Device and dtype are chosen at run time: CUDA + bf16 when available, else CPU fp32.
Families: `tiny` (model/tiny.py) and `llava_onevision` (LlavaOnevisionForConditionalGeneration,
Qwen2 text decoder), run as transformers runs a video: the video processor's normalisation,
the model's own `get_video_features` (bilinear pooling of the g x g patch grid to
ceil(g/2) x ceil(g/2), so n0 = 196 at 384 px with 14 px patches) and its `image_newline`
once after the last frame (`LlavaOnevisionBackbone`).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from model.retrieval import attach_head, load_head

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
    retrieval = None  # model/retrieval.py RetrievalHead shipped with the checkpoint, if any

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


@dataclass(frozen=True)
class VideoPreprocess:
    """What LlavaOnevisionVideoProcessor does to frames, from the checkpoint's processor config.

    framekv decodes frames at the processor's (height, width) already, so its bicubic
    resize is the identity and only the rescale + normalisation remain, computed as
    transformers' fused `rescale_and_normalize` does (mean and std divided by the rescale
    factor, then (x - mean) / std in float32). The processor class itself needs
    torchvision, which framekv does not depend on; its defaults and file lookup are used.
    """

    size: tuple[int, int]  # (H, W)
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_pretrained(cls, path: str) -> VideoPreprocess:
        """The processor config transformers would load for `path` (processor_config.json's
        video_processor, else video_preprocessor_config.json, else preprocessor_config.json),
        over LlavaOnevisionVideoProcessor's class defaults."""
        # the module itself: transformers' top-level name is a placeholder without torchvision
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor as P)

        try:
            raw, _ = P.get_video_processor_dict(path)
        except OSError as e:
            raise ValueError(f"model {path!r} has no video processor config (processor_config.json, "
                             "video_preprocessor_config.json or preprocessor_config.json): its frame "
                             f"normalisation is unknown ({e})") from None
        keys = ("size", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
        cfg = {k: getattr(P, k) for k in keys} | {k: raw[k] for k in keys if k in raw}
        size = cfg["size"]
        if set(size) != {"height", "width"}:
            raise ValueError(f"model {path!r}: video processor size {size} is not {{height, width}}, "
                             "the only form LLaVA-OneVision's video path uses")
        return cls(size=(int(size["height"]), int(size["width"])), do_rescale=bool(cfg["do_rescale"]),
                   rescale_factor=float(cfg["rescale_factor"]), do_normalize=bool(cfg["do_normalize"]),
                   mean=tuple(cfg["image_mean"]), std=tuple(cfg["image_std"]))

    def __call__(self, frames: Tensor) -> Tensor:
        """uint8 [F, H, W, 3] RGB at `size` -> float32 pixel values [F, 3, H, W]."""
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        if self.do_normalize:
            scale = 1.0 / self.rescale_factor if self.do_rescale else 1.0
            mean = (torch.tensor(self.mean, device=x.device) * scale).view(1, -1, 1, 1)
            std = (torch.tensor(self.std, device=x.device) * scale).view(1, -1, 1, 1)
            return (x - mean) / std
        return x * self.rescale_factor if self.do_rescale else x


class LlavaOnevisionBackbone(Backbone):
    """LLaVA-OneVision / LLaVA-Video: SigLIP tower + projector + Qwen2 decoder, video path.

    Token layout, as transformers' processor and forward build it for one video of F frames:
    `prefix | F x n0 frame tokens | image_newline | question`. n0 = ceil(g/2)^2 for the
    vision tower's g x g patch grid (g = image_size // patch_size). The newline is one
    learned embedding per video, after the last frame, so it is not a frame token: it
    travels with the question as the `<video>` placeholder id that `question_ids` puts
    first and `embed_ids` replaces by `image_newline`, exactly as transformers scatters
    video features over the placeholder ids. The selected frames of an answer are the
    video it follows.
    """

    def __init__(self, model, tokenizer, model_id: str, revision: str, preprocess: VideoPreprocess):
        super().__init__()
        self.vlm = model
        self.decoder = model.model.language_model
        self.lm_head = model.lm_head
        self.tokenizer = tokenizer
        self.model_id, self.revision, self.preprocess = model_id, revision, preprocess
        vc = model.config.vision_config
        if preprocess.size != (vc.image_size, vc.image_size):
            raise ValueError(f"model {model_id}: video processor size {preprocess.size} differs from the vision "
                             f"tower's {vc.image_size} x {vc.image_size}; transformers' pooling needs them equal")
        grid = vc.image_size // vc.patch_size
        self.pooled_grid = (math.ceil(grid / 2), math.ceil(grid / 2))  # as LlavaOnevisionModel.apply_pooling
        self.n0 = self.pooled_grid[0] * self.pooled_grid[1]
        self.image_size = preprocess.size
        self.video_token_id = model.config.video_token_id
        self._prefix, self._before, self._after = question_template(tokenizer)

    def embed_frames(self, frames, times, duration: float) -> Tensor:
        """transformers' `get_video_features` over the window's frames, its trailing
        image_newline left to the question: -> [F, n0, D], pooled grid row-major."""
        frames, _ = self.check_frames(frames, times)
        pixels = self.preprocess(frames).to(self.dtype)
        feats = self.vlm.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output
        f = frames.shape[0]
        if feats.shape[:2] != (1, f * self.n0 + 1):
            raise RuntimeError(f"transformers' LLaVA-OneVision video features have shape {tuple(feats.shape)}, "
                               f"expected [1, {f} x {self.n0} + 1 newline, D]: its pooling changed")
        return feats[0, :-1].reshape(f, self.n0, -1)

    def embed_ids(self, ids: Tensor) -> Tensor:
        """Token embeddings [..., D]; the `<video>` placeholder id becomes image_newline."""
        ids = ids.to(self.device)
        emb = self.decoder.embed_tokens(ids)
        slot = (ids == self.video_token_id)[..., None]
        return torch.where(slot, self.vlm.model.image_newline.to(emb.dtype), emb)

    def _ids(self, text: str) -> Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def prefix_ids(self) -> Tensor:
        return self._ids(self._prefix)

    def question_ids(self, question: str) -> tuple[Tensor, Tensor]:
        """[newline slot | template | words | template]; the mask marks the words."""
        if not question.strip():
            raise ValueError("question is empty")
        parts = [torch.tensor([self.video_token_id]), self._ids(self._before), self._ids(question.strip()),
                 self._ids(self._after)]
        mask = torch.cat([torch.full((len(p),), i == 2, dtype=torch.bool) for i, p in enumerate(parts)])
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
    preprocess = VideoPreprocess.from_pretrained(path)
    return LlavaOnevisionBackbone(model, tokenizer, model_id, revision, preprocess).to(device)


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
        else:
            bb = _load_llava_onevision(str(path), model_id, revision, device, dtype, trust_remote_code)
        attach_head(bb, load_head(path, bb.decoder.config.hidden_size))
        return bb
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ValueError(f"model {spec!r} is neither 'tiny', an existing directory, nor a hub id (org/name)")
    from transformers import AutoConfig

    with _remote_code_refused(spec, trust_remote_code):  # needs a reachable hub (or its local cache)
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    if config.model_type != "llava_onevision":
        raise ValueError(f"unsupported model family {config.model_type!r} for {spec}; supported: llava_onevision")
    revision = getattr(config, "_commit_hash", None) or "main"
    return _load_llava_onevision(spec, spec, revision, device, dtype, trust_remote_code)
