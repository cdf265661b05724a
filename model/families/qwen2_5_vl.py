"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), run as transformers runs a video.

Frames: the video processor's rules (Qwen2VLVideoProcessor; its module needs torchvision,
which framekv does not install, so its steps are written out in `TubeletPreprocess`):
frames are decoded at a size its `smart_resize` keeps (so its bicubic resize is the
identity), rescaled and normalised as its fused `rescale_and_normalize`, an odd last
frame repeated, then cut into 14 px patches of two frames, grouped 2 x 2 for the merger.
Two frames (temporal_patch_size) are one tubelet, the frame unit framekv caches for this
family (`frame_unit`): its timestamp is its first frame's. n0 = (H / 28) * (W / 28).

Prompt: the chat template's `<|vision_start|><|video_pad|>*N<|vision_end|>`; the prefix
ends with vision_start, the question begins with vision_end.

Positions (3-D M-RoPE, `rope_3d`), as the model's `get_rope_index`: the prefix text at
0..P-1 on all three axes; a tubelet token at P + (t, h, w), with (h, w) its merged grid
cell (the model's own `get_vision_position_ids`) and t = floor(tokens_per_second x its
time in seconds), the absolute time id that transformers computes as tubelet index x
tokens_per_second x second_per_grid_ts for a video whose first frame is at 0 s; the text
after the video from P + max(H, W) / 28 on (`text_offset`). Selected frames keep their
ids at question time, so a "when" question sees each frame's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.backbone import QUESTION_MARK, VLMBackbone, remote_code_refused, use_processor_template

FRAME_SIDE = 448  # frames are decoded square, at smart_resize(448, 448) under the processor's pixel limits
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def video_processor_config(path: str) -> dict:
    """The video processor config transformers would load for `path` (its
    video_preprocessor_config.json or what stands in its place); none is an error."""
    from transformers.video_processing_utils import BaseVideoProcessor

    try:
        raw, _ = BaseVideoProcessor.get_video_processor_dict(path)
    except OSError as e:
        raise ValueError(f"model {path!r} has no video processor config (video_preprocessor_config.json or "
                         f"preprocessor_config.json): its frame normalisation is unknown ({e})") from None
    return raw


@dataclass(frozen=True)
class TubeletPreprocess:
    """Qwen2VLVideoProcessor's steps for frames already at a size it keeps, from the
    checkpoint's processor config over the class defaults."""

    size: tuple[int, int]  # (H, W) frames are decoded at
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_pretrained(cls, path: str) -> TubeletPreprocess:
        """video_preprocessor_config.json (or what transformers would load in its place) over
        Qwen2VLVideoProcessor's defaults; the frame size is `smart_resize` of FRAME_SIDE
        within its min/max pixels."""
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        raw = video_processor_config(path)
        size = dict(raw.get("size") or {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768})
        size["shortest_edge"] = raw.get("min_pixels", size.get("shortest_edge"))
        size["longest_edge"] = raw.get("max_pixels", size.get("longest_edge"))
        patch, merge = int(raw.get("patch_size", 14)), int(raw.get("merge_size", 2))
        h, w = smart_resize(FRAME_SIDE, FRAME_SIDE, factor=patch * merge, min_pixels=size["shortest_edge"],
                            max_pixels=size["longest_edge"])
        return cls.from_config(raw, (h, w), patch, int(raw.get("temporal_patch_size", 2)), merge,
                               OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    @classmethod
    def from_config(cls, raw: dict, size: tuple[int, int], patch: int, temporal: int, merge: int,
                    mean: tuple[float, ...], std: tuple[float, ...]) -> TubeletPreprocess:
        """The rescale / normalisation fields from a processor config `raw`, over the class
        defaults (rescale by 1/255, `mean` / `std`), at a decided frame size and patching."""
        return cls(size=size, patch_size=patch, temporal_patch_size=temporal, merge_size=merge,
                   do_rescale=bool(raw.get("do_rescale", True)),
                   rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(raw.get("do_normalize", True)),
                   mean=tuple(raw.get("image_mean", mean)), std=tuple(raw.get("image_std", std)))

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of patches per frame."""
        return self.size[0] // self.patch_size, self.size[1] // self.patch_size

    def __call__(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 [F, H, W, 3] RGB at `size` -> (pixel_values_videos [T * gh * gw, 3 * tp * p * p]
        float32, video_grid_thw [1, 3]), T = ceil(F / tp): as the processor's patchify."""
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        if self.do_normalize:  # fused: mean and std scaled by 1 / rescale_factor
            scale = 1.0 / self.rescale_factor if self.do_rescale else 1.0
            mean = (torch.tensor(self.mean, device=x.device) * scale).view(1, -1, 1, 1)
            std = (torch.tensor(self.std, device=x.device) * scale).view(1, -1, 1, 1)
            x = (x - mean) / std
        elif self.do_rescale:
            x = x * self.rescale_factor
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -len(x) % tp:  # the last frame repeated to fill the tubelet
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        t, (gh, gw) = len(x) // tp, self.grid
        x = x.view(t, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(t * gh * gw, 3 * tp * p * p), torch.tensor([[t, gh, gw]], device=x.device)


def video_template(tokenizer, model_id: str) -> tuple[str, str, str]:
    """(prefix up to and with vision_start, vision_end + text before the question, after it):
    the chat template rendered for a user turn of a video then the question, as
    Qwen2_5_VLProcessor.apply_chat_template renders it."""
    content = [{"type": "video"}, {"type": "text", "text": QUESTION_MARK}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # no template, or one that cannot render typed content
        raise ValueError(f"model {model_id}: its chat template does not render a video ({e})") from None
    if text.count(VIDEO) != 1 or text.count(QUESTION_MARK) != 1 or text.index(VIDEO) > text.index(QUESTION_MARK):
        raise ValueError(f"model {model_id}: its chat template does not render a video as {VIDEO} before the "
                         f"question: {text!r}")
    prefix, rest = text.split(VIDEO)
    before, after = rest.split(QUESTION_MARK)
    return prefix + "<|vision_start|>", "<|vision_end|>" + before, after


def check_tubelet_model(model, model_id: str, preprocess: TubeletPreprocess):
    """A Qwen-style tubelet model framekv can run: the processor's patch, temporal patch
    and merge equal the vision tower's, and no sliding-window layers. -> its vision config."""
    vc = model.config.vision_config
    own = (vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
    if (preprocess.patch_size, preprocess.temporal_patch_size, preprocess.merge_size) != own:
        raise ValueError(f"model {model_id}: video processor (patch, temporal patch, merge) = "
                         f"{(preprocess.patch_size, preprocess.temporal_patch_size, preprocess.merge_size)} "
                         f"differ from the vision tower's {own}")
    if "sliding_attention" in (getattr(model.config.text_config, "layer_types", None) or ()):
        raise ValueError(f"model {model_id}: sliding-window attention layers are not supported (framekv's "
                         "decoder attends every cached token)")
    return vc


class Qwen2_5_VLBackbone(VLMBackbone):
    """Qwen2.5-VL's vision tower + merger, and its Qwen2-style decoder with M-RoPE."""

    rope_3d = True

    def __init__(self, model, tokenizer, model_id: str, revision: str, preprocess: TubeletPreprocess):
        super().__init__(model, tokenizer, model_id, revision, preprocess)
        vc = check_tubelet_model(model, model_id, preprocess)
        self.frame_unit = vc.temporal_patch_size  # frames per tubelet: the cached frame unit
        self.tokens_per_second = float(vc.tokens_per_second)
        gh, gw = preprocess.grid
        self.merged_grid = (gh // vc.spatial_merge_size, gw // vc.spatial_merge_size)
        self.n0 = self.merged_grid[0] * self.merged_grid[1]
        self.image_size = preprocess.size
        self.video_token_id = model.config.video_token_id
        # (h, w) ids of one tubelet's tokens [n0, 3], by the model's own rule (t = 0 here)
        self._grid_ids = model.model.get_vision_position_ids(
            0, torch.tensor([1, gh, gw]), 1, vc.spatial_merge_size).T.contiguous()
        self._prefix, self._before, self._after = video_template(tokenizer, model_id)

    def embed_frames(self, frames, times, duration: float) -> Tensor:
        """transformers' `get_video_features` over the window's frames: -> [T, n0, D], T =
        ceil(F / 2) tubelets, each tubelet's merged grid row-major."""
        frames, _ = self.check_frames(frames, times)
        pixels, grid_thw = self.preprocess(frames)
        feats = self.vlm.model.get_video_features(pixel_values_videos=pixels.to(self.dtype),
                                                  video_grid_thw=grid_thw).pooler_output
        t = int(grid_thw[0, 0])
        if len(feats) != 1 or feats[0].shape[0] != t * self.n0:
            raise RuntimeError(f"transformers' Qwen2.5-VL video features have shapes {[f.shape for f in feats]}, "
                               f"expected one [{t} x {self.n0}, D]: its merger changed")
        return feats[0].reshape(t, self.n0, -1)

    def frame_positions(self, times: Tensor) -> Tensor:
        """Tubelet times [T] (seconds) -> (t, h, w) ids [T, n0, 3] from the first video token."""
        t_ids = (torch.as_tensor(times, dtype=torch.float64) * self.tokens_per_second).long()
        ids = self._grid_ids.to(t_ids.device).expand(len(t_ids), -1, -1).clone()
        ids[..., 0] += t_ids[:, None]
        return ids

    def text_offset(self, times: Tensor | None = None) -> int:
        """max(grid) whatever the tubelets' times."""
        return max(self.merged_grid)


def load(path: str, model_id: str, revision: str, device, dtype, trust_remote_code: bool) -> Qwen2_5_VLBackbone:
    """Weights always go into transformers' own Qwen2.5-VL class; a checkpoint's code can
    only be reached through its tokenizer/config `auto_map`, with trust_remote_code."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    with remote_code_refused(path, trust_remote_code):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    use_processor_template(tokenizer, path)
    return Qwen2_5_VLBackbone(model, tokenizer, model_id, revision, TubeletPreprocess.from_pretrained(path)).to(device)
