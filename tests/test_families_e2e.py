"""Every real VLM family end to end: `framekv ingest --model DIR` on a generated video, then
`framekv ask --model DIR` about it, on a reduced random checkpoint of the real
architecture (tests/llava_tiny.py, tests/qwen2_5_vl_tiny.py, tests/qwen3_vl_tiny.py). The answers mean nothing
(random weights); what is checked is the pipeline: the video is ready with one window
row per window, its frame units (the Qwen families: two-frame tubelets) are what the
catalog and the answer's evidence name, and the question's words reach the model. And
the second compressor the same way: a VST index (`--compression vst`, the shipped
tiny-vst checkpoint)."""

from __future__ import annotations


import numpy as np
import pytest

from jobs.cli import main
from model.synth import make_video
from pipeline.catalog import Catalog
from pipeline.query import readers_for
from pipeline.store import open_store
from model.backbone import load_backbone
from tests.llava_tiny import save_tiny_llava
from tests.qwen2_5_vl_tiny import save_tiny_qwen2_5_vl
from tests.qwen3_vl_tiny import save_tiny_qwen3_vl
from tests.output import json_out

pytestmark = pytest.mark.slow
SECONDS = 8  # at 1 fps: 8 frames, 2 windows of 4
# (checkpoint writer, frame unit, score mode: Qwen3-VL places the question after the frames' timestamp text)
FAMILIES = {"llava_onevision": (save_tiny_llava, 1, "fast"), "qwen2_5_vl": (save_tiny_qwen2_5_vl, 2, "fast"),
            "qwen3_vl": (save_tiny_qwen3_vl, 2, "exact")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ingest_and_ask_with_a_family_checkpoint(family, tmp_path, local_ray, capsys):
    save, unit, score = FAMILIES[family]
    model = str(save(tmp_path / family))
    src = tmp_path / "src"
    src.mkdir()
    make_video(seed=7, num_frames=SECONDS).write_h264(src / "clip.mp4", size=(64, 64))
    index = str(tmp_path / "index")
    common = ["--model", model]
    assert main(["ingest", str(src), "--index", index, "--window", "4", "--no-progress", *common]) == 0
    (video,) = Catalog(index).serving_videos()
    assert video.status == "ready" and video.windows == SECONDS // 4 and video.frames == SECONDS // unit
    windows = Catalog(index).window_rows(video.video_id, video.model_fp)
    assert [w.frames for w in windows] == [4 // unit] * (SECONDS // 4)

    capsys.readouterr()
    assert main(["ask", index, "what colour is the star ?", "--k", "2", "--score", score, "--json", *common]) == 0
    out = json_out(capsys)
    assert out["video"]["video_id"] == video.video_id and len(out["evidence"]) == 2
    units = load_backbone(model).unit_times(np.arange(SECONDS) + 0.5)  # 1 fps from 0.5 s, by the family's rule
    assert {e["time"] for e in out["evidence"]} <= set(np.asarray(units).tolist())


def test_ingest_and_ask_a_vst_index(tmp_path, local_ray, capsys):
    """`--compression vst` with the shipped tiny-vst checkpoint: the objects hold one
    summary a frame (vst16: 16 tokens -> 1 at every layer), and `ask` answers from them,
    cached and re-encoded alike."""
    src = tmp_path / "src"
    src.mkdir()
    make_video(seed=7, num_frames=SECONDS).write_h264(src / "clip.mp4", size=(64, 64))
    index = str(tmp_path / "index")
    vst = ["--model", "tiny-vst"]
    assert main(["ingest", str(src), "--index", index, "--window", "4", "--no-progress", "--compression", "vst",
                 *vst]) == 0
    (video,) = Catalog(index).serving_videos()
    assert video.status == "ready" and video.frames == SECONDS
    reader = readers_for(Catalog(index), open_store(index), video)[0]
    assert reader.meta.policy == "vst16" and reader.meta.schedule == [1] * len(reader.meta.schedule)
    answers = []
    for mode in ("cached", "reencode"):
        capsys.readouterr()
        assert main(["ask", index, "what colour is the star ?", "--video", video.video_id, "--k", "4",
                     "--answer", mode, "--json", *vst]) == 0
        answers.append(json_out(capsys)["answer"])
    assert answers[0] == answers[1]
