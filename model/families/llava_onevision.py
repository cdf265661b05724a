"""LLaVA-OneVision / LLaVA-Video (LlavaOnevisionForConditionalGeneration, Qwen2 text decoder).

Run as transformers runs a video: the video processor's normalisation, the model's own
`get_video_features` (bilinear pooling of the g x g patch grid to ceil(g/2) x ceil(g/2),
so n0 = 196 at 384 px with 14 px patches) and its `image_newline` once after the last
frame. Positions are 1-D: one index per token, renumbered by LP-Comp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from model.backbone import VLMBackbone, question_template, remote_code_refused, use_processor_template


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


class LlavaOnevisionBackbone(VLMBackbone):
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
        super().__init__(model, tokenizer, model_id, revision, preprocess)
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

    def _lead_ids(self) -> Tensor:
        """The `<video>` slot that carries image_newline (`embed_ids`)."""
        return torch.tensor([self.video_token_id])


def load(path: str, model_id: str, revision: str, device, dtype, trust_remote_code: bool) -> LlavaOnevisionBackbone:
    """Weights always go into transformers' own LLaVA-OneVision class; a checkpoint's code
    can only be reached through its tokenizer/config `auto_map`, with trust_remote_code."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    with remote_code_refused(path, trust_remote_code):
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    use_processor_template(tokenizer, path)
    preprocess = VideoPreprocess.from_pretrained(path)
    return LlavaOnevisionBackbone(model, tokenizer, model_id, revision, preprocess).to(device)
