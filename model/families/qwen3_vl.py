"""Qwen3-VL (Qwen3VLForConditionalGeneration), run as transformers runs a video.

Frames: Qwen3VLVideoProcessor's rules (its module needs torchvision, which framekv does not
install; the steps are Qwen2.5-VL's `TubeletPreprocess` with Qwen3-VL's defaults): 16 px
patches, 2 x 2 merge, two frames a tubelet, ImageNet-standard mean/std 0.5 unless the
checkpoint's config says otherwise. Frames are decoded at `smart_resize` of FRAME_SIDE for
one tubelet within the processor's pixel limits, a size its resize keeps for a clip of one
tubelet (its limit is over the whole video, so it would shrink the frames of a longer one;
framekv's cached frames cannot depend on the video's length: docs/MODELS.md, approximate).

Prompt (Qwen3VLProcessor.replace_video_token, which expands only the template's
`<|video_pad|>`, so the template's own vision_start/vision_end stay around the video):

    ...user\\n<|vision_start|>  then per tubelet  <t.t seconds><|vision_start|> pad*n <|vision_end|>
    then <|vision_end|> question <|im_end|>\\n<|im_start|>assistant\\n

t.t = the mean time of the tubelet's two frames (the processor's `_calculate_timestamps`;
`unit_times`). A cached frame unit therefore carries its own text: `n0` slots =
[left padding | timestamp text + vision_start (`lead` slots) | n_vis video tokens |
vision_end]. The timestamp's token count grows with its integer digits, so the lead
slots hold the longest timestamp framekv accepts (MAX_SECONDS); the unused ones are
padding (`unit_valid` False: masked out everywhere, never seen by the model). Text slots
are never dropped by LP-Comp (`unit_text`), and carry no DeepStack features.

Positions (the model's get_rope_index): textual timestamps split the video into one
image-like grid per tubelet, so ids run on sequentially: prefix 0..P-1, a tubelet's text
at c, c + 1, ..., its video tokens at c' + (0, row, col), its vision_end at c' + max(grid),
the next tubelet's text right after. There is no absolute time id: a tubelet's time is its
text. Selected frames are positioned as the video made of them (`frame_positions` of the
selected times), the question after them (`text_offset`).

DeepStack: the vision tower also returns one feature map per `deepstack_visual_indexes`
entry; the decoder adds map l to the video tokens' hidden states after decoder layer l.
`embed_frames` returns them behind the main features ([T, n0, D x (1 + deepstack_layers)]),
so LP-Comp (model/lpcomp.py) adds them to the tokens each layer keeps, at ingest and in
`reencode`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from model.backbone import VLMBackbone, frame_units, remote_code_refused, use_processor_template
from model.families.qwen2_5_vl import TubeletPreprocess, check_tubelet_model, video_processor_config, video_template

FRAME_SIDE = 448  # frames are decoded square, at smart_resize(448, 448) for one tubelet under the pixel limits
MAX_SECONDS = 99999.9  # the longest timestamp a frame unit has room for (27.7 h)


def preprocess_from_pretrained(path: str) -> TubeletPreprocess:
    """video_preprocessor_config.json (or what transformers loads in its place) over
    Qwen3VLVideoProcessor's defaults; the frame size is its `smart_resize` of FRAME_SIDE for
    one tubelet (temporal_patch_size frames) within min/max pixels."""
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    raw = video_processor_config(path)
    size = dict(raw.get("size") or {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768})
    patch, merge, tp = int(raw.get("patch_size", 16)), int(raw.get("merge_size", 2)), int(raw.get("temporal_patch_size", 2))
    h, w = smart_resize(tp, FRAME_SIDE, FRAME_SIDE, temporal_factor=tp, factor=patch * merge,
                        min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return TubeletPreprocess.from_config(raw, (h, w), patch, tp, merge, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)


class Qwen3VLBackbone(VLMBackbone):
    """Qwen3-VL's vision tower (merger + DeepStack mergers) and its Qwen3 decoder
    (q/k norms, interleaved M-RoPE)."""

    rope_3d = True

    def __init__(self, model, tokenizer, model_id: str, revision: str, preprocess: TubeletPreprocess):
        super().__init__(model, tokenizer, model_id, revision, preprocess)
        vc = check_tubelet_model(model, model_id, preprocess)
        self.frame_unit = vc.temporal_patch_size
        self.deepstack_layers = len(vc.deepstack_visual_indexes)
        gh, gw = preprocess.grid
        self.merged_grid = (gh // vc.spatial_merge_size, gw // vc.spatial_merge_size)
        self.n_vis = self.merged_grid[0] * self.merged_grid[1]
        self.lead = len(self._timestamp_ids(MAX_SECONDS))
        self.unit_text = (self.lead, 1)
        self.n0 = self.lead + self.n_vis + 1
        self.image_size = preprocess.size
        self.video_token_id = model.config.video_token_id
        self.vision_end_id = model.config.vision_end_token_id
        # (t, h, w) ids of one tubelet's video tokens from 0 [n_vis, 3], by the model's own rule
        self._grid_ids = model.model.get_vision_position_ids(
            0, torch.tensor([1, gh, gw]), 1, vc.spatial_merge_size).T.contiguous()
        self._prefix, self._before, self._after = video_template(tokenizer, model_id)

    def _timestamp_ids(self, seconds: float) -> Tensor:
        """A tubelet's text before its video tokens: `<t.t seconds><|vision_start|>`."""
        if not 0 <= seconds <= MAX_SECONDS:
            raise ValueError(f"frame time {seconds} s outside 0..{MAX_SECONDS} s, the timestamps a Qwen3-VL "
                             "frame unit has room for")
        return self._ids(f"<{seconds:.1f} seconds><|vision_start|>")

    def unit_times(self, times) -> np.ndarray:
        """Decoded frame times [F] -> each tubelet's timestamp [ceil(F / 2)]: the mean of its
        two frames' (an odd last frame repeated), as the processor's `_calculate_timestamps`."""
        t = frame_units(np.asarray(times, dtype=np.float64), self.frame_unit)
        return (t[:, 0] + t[:, -1]) / 2

    def unit_ids(self, seconds: float) -> Tensor:
        """Token ids of one frame unit's n0 slots [n0]: padding (the pad token), timestamp text,
        vision_start, video pads, vision_end."""
        lead = self._timestamp_ids(seconds)
        pad = torch.full((self.lead - len(lead),), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        return torch.cat([pad, lead, torch.full((self.n_vis,), self.video_token_id), torch.tensor([self.vision_end_id])])

    def unit_valid(self, times: Tensor) -> Tensor:
        """Unit times [T] -> [T, n0] bool: False on the lead padding slots."""
        valid = torch.ones(len(times), self.n0, dtype=torch.bool)
        for i, t in enumerate(torch.as_tensor(times, dtype=torch.float64).tolist()):
            valid[i, : self.lead - len(self._timestamp_ids(t))] = False
        return valid

    def embed_frames(self, frames, times, duration: float) -> Tensor:
        """transformers' `get_video_features` over the window's frames, laid out in frame units:
        -> [T, n0, D x (1 + deepstack_layers)]: the unit's input embeddings (text slots: the
        token embeddings, padding zero), then each DeepStack map (zero on text slots)."""
        frames, times = self.check_frames(frames, times)
        pixels, grid_thw = self.preprocess(frames)
        out = self.vlm.model.get_video_features(pixel_values_videos=pixels.to(self.dtype), video_grid_thw=grid_thw)
        t = int(grid_thw[0, 0])
        feats, deep = out.pooler_output, out.deepstack_features
        if (len(feats) != 1 or feats[0].shape[0] != t * self.n_vis or len(deep) != self.deepstack_layers
                or any(len(d) != 1 or d[0].shape != feats[0].shape for d in deep)):
            raise RuntimeError(f"transformers' Qwen3-VL video features have shapes {[f.shape for f in feats]} and "
                               f"DeepStack {[[x.shape for x in d] for d in deep]}, expected one [{t} x {self.n_vis}, D] "
                               f"each for {self.deepstack_layers} DeepStack layers: its vision tower changed")
        d = feats[0].shape[-1]
        unit_times = self.unit_times(times.cpu().numpy())
        ids = torch.stack([self.unit_ids(s) for s in unit_times]).to(self.device)  # [T, n0]
        valid = self.unit_valid(torch.from_numpy(unit_times)).to(self.device)
        main = self.embed_ids(ids) * valid[..., None]
        vis = slice(self.lead, self.lead + self.n_vis)
        main[:, vis] = feats[0].reshape(t, self.n_vis, d).to(main.dtype)
        parts = [main]
        for f in deep:
            x = main.new_zeros(t, self.n0, d)
            x[:, vis] = f[0].reshape(t, self.n_vis, d).to(main.dtype)
            parts.append(x)
        return torch.cat(parts, -1)

    def frame_positions(self, times: Tensor) -> Tensor:
        """Unit times [T] (seconds) -> (t, h, w) ids [T, n0, 3] from the first video token, the
        units laid out one after another as get_rope_index places tubelets split by their
        timestamps (padding slots at 0: they are masked)."""
        m = max(self.merged_grid)
        ids = torch.zeros(len(times), self.n0, 3, dtype=torch.long)
        c = 0
        for i, t in enumerate(torch.as_tensor(times, dtype=torch.float64).tolist()):
            n = len(self._timestamp_ids(t))
            ids[i, self.lead - n : self.lead] = torch.arange(c, c + n)[:, None]
            c += n
            ids[i, self.lead : self.lead + self.n_vis] = c + self._grid_ids
            ids[i, -1] = c + m
            c += m + 1
        return ids

    def text_offset(self, times: Tensor | None = None) -> int:
        """The first text token after units at `times` sits at P + this id."""
        if times is None:
            raise ValueError(f"model {self.model_id}: the text after the video follows the frames' timestamp text, "
                             "so its position needs the frames' times (`fast` scoring places the question "
                             "without a video: use `exact`)")
        times = torch.as_tensor(times, dtype=torch.float64).tolist()
        return sum(len(self._timestamp_ids(t)) for t in times) + len(times) * (max(self.merged_grid) + 1)


def load(path: str, model_id: str, revision: str, device, dtype, trust_remote_code: bool) -> Qwen3VLBackbone:
    """Weights always go into transformers' own Qwen3-VL class; a checkpoint's code can only
    be reached through its tokenizer/config `auto_map`, with trust_remote_code."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    with remote_code_refused(path, trust_remote_code):
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    use_processor_template(tokenizer, path)
    return Qwen3VLBackbone(model, tokenizer, model_id, revision, preprocess_from_pretrained(path)).to(device)
