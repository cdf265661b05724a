"""Library search vectors: a frame's and a question's, comparable by cosine.

    vecs = frame_vectors(backbone, embs, keys)       # [F, d] unit, stored in the catalog's frames.vector
    v = question_vector(backbone, ctx, fast_layers)  # [d] unit, searched against them

The first stage of a library question (pipeline/query.py) is a nearest-neighbour search
of the question's vector over every frame of the library; QC-Comp then re-ranks the
videos of the nearest frames from their cached K/V. Two kinds of vectors:

- A trained `RetrievalHead`, shipped beside a checkpoint's weights (retrieval.json +
  retrieval.safetensors, trained by model/train_retrieval.py): a frame's embedding
  (the backbone's `embed_frames` tokens, mean and max over them) and the question's
  word embeddings (a learned softmax gate over words, so "what"/"the" weigh little)
  each through a small MLP into one `dim`-space, trained contrastively: a question
  against frames that show its subject and frames that do not, across videos.
- Without a head (a checkpoint nobody trained one for): the model's own states, the
  pre-RoPE keys of one fast layer pooled over the frame's kept tokens, against the
  question's pooled pre-RoPE queries of that layer. Before normalisation their dot
  product is exactly kv_heads x the frame's mean unscaled q.k logit over heads,
  question tokens and frame tokens (RoPE left out): an approximation of QC scoring,
  not trained for retrieval.

Vectors of different models (or head and no head) are not comparable: the catalog
keeps each model's frames apart (model_fp) and searches each with its own vector.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from model.qccomp import question_queries

HEAD_CONFIG, HEAD_WEIGHTS = "retrieval.json", "retrieval.safetensors"


@dataclass(frozen=True)
class HeadConfig:
    hidden: int  # the backbone's embedding width D
    dim: int = 64  # the joint space
    width: int = 256  # the MLPs' inner width

    def __post_init__(self) -> None:
        if min(self.hidden, self.dim, self.width) < 1:
            raise ValueError(f"retrieval head sizes must be >= 1, got {self}")


def pool_frames(embs: Tensor) -> Tensor:
    """Frame tokens [F, n0, D] -> [F, 2D]: mean and max over the frame's tokens (what
    the head's frame side reads; training precomputes it once per frame)."""
    return torch.cat([embs.mean(1), embs.amax(1)], dim=-1)


class RetrievalHead(nn.Module):
    """Frames and questions into one unit-norm space (see the module docstring)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.frame = nn.Sequential(nn.Linear(2 * cfg.hidden, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.dim))
        self.word = nn.Sequential(nn.Linear(cfg.hidden, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.dim))
        self.gate = nn.Linear(cfg.hidden, 1)

    def embed_frames(self, embs: Tensor) -> Tensor:
        """Frame tokens [F, n0, D] -> [F, dim] unit vectors."""
        x = pool_frames(embs).to(self.frame[0].weight.dtype)
        return nn.functional.normalize(self.frame(x), dim=-1)

    def embed_question(self, words: Tensor, valid: Tensor | None = None) -> Tensor:
        """Word embeddings [B, R, D] (valid [B, R] bool marks real words) -> [B, dim] unit
        vectors: each word projected, then a softmax gate over the words pools them."""
        words = words.to(self.word[0].weight.dtype)
        gate = self.gate(words).squeeze(-1)
        if valid is not None:
            gate = gate.masked_fill(~valid, float("-inf"))
        pooled = (gate.softmax(-1)[..., None] * self.word(words)).sum(-2)
        return nn.functional.normalize(pooled, dim=-1)

    def save(self, path: Path) -> None:
        """retrieval.json + retrieval.safetensors into a checkpoint directory."""
        path = Path(path)
        (path / HEAD_CONFIG).write_text(json.dumps(asdict(self.cfg), indent=1) + "\n")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(path / HEAD_WEIGHTS))


def load_head(path: Path, hidden: int) -> RetrievalHead | None:
    """The head shipped in checkpoint directory `path`, or None if it has none. A head of
    another width than the backbone's (`hidden`) is an error naming the file."""
    path = Path(path)
    if not (path / HEAD_CONFIG).is_file():
        return None
    try:
        cfg = HeadConfig(**json.loads((path / HEAD_CONFIG).read_text()))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / HEAD_CONFIG}: not a retrieval head config: {e}") from None
    if cfg.hidden != hidden:
        raise ValueError(f"{path / HEAD_CONFIG}: head for width {cfg.hidden}, the backbone's is {hidden}")
    head = RetrievalHead(cfg)
    state = load_file(str(path / HEAD_WEIGHTS))
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path / HEAD_WEIGHTS}: does not fit the head {path / HEAD_CONFIG} describes: {e}") from None
    return head.eval()


def attach_head(backbone, head: RetrievalHead | None) -> None:
    """Give `backbone` its head (or none), on its device. Kept out of the backbone's
    modules so its state dict, and a checkpoint saved from it, stay the backbone's own."""
    object.__setattr__(backbone, "retrieval", None if head is None else head.to(backbone.device))


def pooled_key_vectors(keys: Tensor) -> np.ndarray:
    """Pre-RoPE keys [F, n, kv_heads, head_dim] -> unit vectors [F, kv_heads * head_dim]."""
    return _unit(keys.float().mean(1).flatten(1))


def pooled_query_vector(queries: Tensor, kv_heads: int) -> np.ndarray:
    """Pre-RoPE question queries [Q, heads, head_dim] -> unit vector [kv_heads * head_dim],
    comparable with `pooled_key_vectors` of the same layer."""
    if queries.dim() != 3:
        raise ValueError(f"queries must be [Q, heads, head_dim], got {tuple(queries.shape)}")
    _, heads, hd = queries.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group into {kv_heads} kv heads")
    grouped = queries.float().mean(0).reshape(kv_heads, heads // kv_heads, hd).mean(1)
    return _unit(grouped.flatten())


def vector_layer(fast_layers: Sequence[int]) -> int:
    """The layer whose keys make head-less frame vectors: the middle fast layer."""
    return fast_layers[len(fast_layers) // 2]


@torch.inference_mode()
def frame_vectors(backbone, embs: Tensor, keys: Sequence[Tensor], fast_layers: Sequence[int]) -> np.ndarray:
    """A window's frame vectors [F, d] float32: the backbone's head over the frames'
    embeddings `embs` [F, n0, D], else its pooled keys (keys[l]: [F, n, kvh, hd] per layer)."""
    head = getattr(backbone, "retrieval", None)
    if head is not None:
        return head.embed_frames(embs).float().cpu().numpy()
    return pooled_key_vectors(keys[vector_layer(fast_layers)])


@torch.inference_mode()
def question_vector(backbone, ctx, fast_layers: Sequence[int]) -> np.ndarray:
    """A question's vector [d] float32 (ctx: model.qccomp.QuestionContext), comparable
    with `frame_vectors` of the same backbone."""
    head = getattr(backbone, "retrieval", None)
    if head is not None:
        return head.embed_question(ctx.question_embs[ctx.user_rows][None])[0].float().cpu().numpy()
    layer = vector_layer(fast_layers)
    return pooled_query_vector(question_queries(backbone, ctx, layer), backbone.decoder.config.num_key_value_heads)


def _unit(x: Tensor) -> np.ndarray:
    return nn.functional.normalize(x, dim=-1).cpu().numpy()
