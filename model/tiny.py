"""The project's own small VLM: conv-stem vision encoder + Qwen2 decoder + word tokenizer.

Small enough to train on a CPU (model/train.py) on synthetic videos (model/synth.py),
so answers mean something offline. Layout of a frame: a strided conv stem turns a
32x32 RGB frame into a 4x4 grid = n0 = 16 tokens (a last stride-1 conv lets every
cell see the whole frame), a projector maps them to the decoder's width, and two
signals are added to every token:
- a frame summary (the grid max-pooled -> linear): LP-Comp keeps only a frame's last
  token at the last layer, so that token must carry what the frame shows; with the
  summary it does from layer 0 on, instead of having to gather it by attention;
- a time signal (sinusoids of t / duration and of t in seconds -> linear), so "when"
  survives frame selection and renumbering.

Prompt: prefix "<bos> <video>", frames, question "<user> {words} <assistant>".

    python -m model.tiny init model/checkpoints/tiny --seed 0    # random-init checkpoint
    bb = TinyVLM.load("model/checkpoints/tiny")                   # or load_backbone("tiny")
    bb.save(dir)                                                 # config.json, model.safetensors, tokenizer.json

VST (model/vst.py): a checkpoint whose model.safetensors also holds `vst.*` tensors
(the summarization embedding and per-layer q/k/v/o projections, written by `save`
when `bb.vst` is set) loads them into `bb.vst`; one without them has `bb.vst = None`
and refuses VST prefill, naming the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

from model.backbone import Backbone
from model.vst import VSTParams

VOCAB_FILE = Path(__file__).parent / "tiny_vocab.txt"
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<video>", "<user>", "<assistant>", "<end>"]


@dataclass
class TinyConfig:
    image_size: int = 32
    n0: int = 16  # tokens per frame: a sqrt(n0) x sqrt(n0) grid after the stem
    stem_channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 conv each: 32 -> 16 -> 8 -> 4, then a stride-1 conv
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    time_freqs: int = 8  # sinusoid pairs for t / duration and for t in seconds
    max_period: float = 10000.0  # seconds, longest period of the absolute-time sinusoids
    rope_theta: float = 10000.0
    vocab_size: int = 0  # set from the tokenizer

    def __post_init__(self) -> None:
        self.stem_channels = tuple(self.stem_channels)
        grid = math.isqrt(self.n0)
        if grid * grid != self.n0:
            raise ValueError(f"n0 must be a square number, got {self.n0}")
        if self.image_size != grid * 2 ** len(self.stem_channels):
            raise ValueError(
                f"image_size {self.image_size} must be sqrt(n0)={grid} x 2^{len(self.stem_channels)} "
                "(one stride-2 conv per stem channel)"
            )

    def qwen2(self) -> Qwen2Config:
        return Qwen2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=1 << 17,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=False,
            pad_token_id=0,
        )


def build_tokenizer(vocab_file: Path = VOCAB_FILE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lower-cased words, punctuation split off, one id per vocab line."""
    words = [w for w in Path(vocab_file).read_text().split("\n") if w.strip()]
    missing = [s for s in SPECIAL if s not in words]
    if missing:
        raise ValueError(f"{vocab_file}: missing special tokens {missing}")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(SPECIAL)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        additional_special_tokens=SPECIAL[4:],
    )


def time_features(times: Tensor, duration: Tensor, freqs: int, max_period: float) -> Tensor:
    """[F, 4 * freqs]: sinusoids of the relative time t / duration (octaves of pi) and of
    the absolute time t in seconds (periods 1 s .. max_period s, geometric)."""
    rel = (times / duration.clamp(min=1e-6))[:, None] * math.pi * 2.0 ** torch.arange(freqs, device=times.device)
    periods = max_period ** (torch.arange(freqs, device=times.device) / max(freqs - 1, 1))
    ab = times[:, None] * (2 * math.pi / periods)
    return torch.cat([rel.sin(), rel.cos(), ab.sin(), ab.cos()], dim=-1).float()


class TinyVLM(Backbone):
    def __init__(self, cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast,
                 model_id: str = "framekv/tiny", revision: str = "unsaved"):
        super().__init__()
        cfg.vocab_size = len(tokenizer)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.model_id, self.revision = model_id, revision
        self.n0, self.image_size = cfg.n0, (cfg.image_size, cfg.image_size)
        layers, c_in = [], 3
        for c in cfg.stem_channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GELU()]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.GELU()]
        self.stem = nn.Sequential(*layers)
        self.summary = nn.Linear(c_in, cfg.hidden_size)
        self.projector = nn.Sequential(nn.Linear(c_in, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.time_proj = nn.Linear(4 * cfg.time_freqs, cfg.hidden_size)
        self.decoder = Qwen2Model(cfg.qwen2())
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.vst: VSTParams | None = None  # VST summarization weights, if the checkpoint has them

    def embed_frames(self, frames, times, duration) -> Tensor:
        """frames uint8 [F, 32, 32, 3], times [F] s, duration s (or [F]) -> [F, n0, D].
        Differentiable in the stem, projector and time projection."""
        frames, times = self.check_frames(frames, times)
        duration = torch.as_tensor(duration, dtype=torch.float64, device=times.device).expand_as(times)
        if (duration < 0).any():
            raise ValueError(f"duration must be >= 0 seconds, got {duration.min().item()}")
        x = frames.permute(0, 3, 1, 2).to(self.dtype) / 255.0 - 0.5
        grid = self.stem(x)  # [F, C, g, g]
        tokens = self.projector(grid.flatten(2).transpose(1, 2))  # [F, n0, D], row-major
        summary = self.summary(grid.amax((2, 3)))  # [F, D]
        when = self.time_proj(time_features(times, duration, self.cfg.time_freqs, self.cfg.max_period).to(self.dtype))
        return tokens + (summary + when)[:, None, :]

    def text_ids(self, text: str) -> Tensor:
        """Word ids of `text` (no template); unknown words are an error naming them."""
        enc = self.tokenizer(text, add_special_tokens=False)
        ids = enc["input_ids"]
        unk = self.tokenizer.unk_token_id
        if unk in ids:
            words = self.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text.lower())
            bad = [w for (w, _), i in zip(words, ids) if i == unk]
            raise ValueError(f"words not in the tiny model's vocabulary ({VOCAB_FILE.name}): {bad} in {text!r}")
        return torch.tensor(ids, dtype=torch.long)

    def prefix_ids(self) -> Tensor:
        return self.text_ids("<bos> <video>")

    def question_ids(self, question: str) -> tuple[Tensor, Tensor]:
        words = self.text_ids(question)
        if len(words) == 0:
            raise ValueError("question is empty")
        ids = torch.cat([self.text_ids("<user>"), words, self.text_ids("<assistant>")])
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[1:-1] = True
        return ids, mask

    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"family": "tiny", "model": asdict(self.cfg)}, indent=1) + "\n")
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"family": "tiny"})
        self.tokenizer.backend_tokenizer.save(str(path / "tokenizer.json"))

    @classmethod
    def load(cls, path, model_id: str = "framekv/tiny", revision: str = "local") -> TinyVLM:
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        if raw.get("family") != "tiny":
            raise ValueError(f"{path}/config.json is not a tiny checkpoint (family={raw.get('family')!r})")
        known = {f.name for f in fields(TinyConfig)}
        cfg = TinyConfig(**{k: v for k, v in raw["model"].items() if k in known})
        tokenizer = wrap_tokenizer(Tokenizer.from_file(str(path / "tokenizer.json")))
        model = cls(cfg, tokenizer, model_id=model_id, revision=revision)
        state = load_file(str(path / "model.safetensors"))
        if any(k.startswith("vst.") for k in state):  # a tiny-vst checkpoint: summarization weights too
            model.vst = VSTParams(model.decoder, tokenizer.eos_token_id)
        missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit this version of the tiny model (missing "
                             f"{sorted(missing)}, unexpected {sorted(unexpected)}): written by older code?")
        model.load_state_dict(state)
        return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model.tiny", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="write a random-init tiny checkpoint")
    init.add_argument("out", type=Path)
    init.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model = TinyVLM(TinyConfig(), build_tokenizer())
    model.save(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.2f}M parameters, vocab {len(model.tokenizer)}")


if __name__ == "__main__":
    main()
