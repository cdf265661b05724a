"""Synthetic needle videos: reproducible, the needle is where the question says, and the
H.264 file decodes to the pictures the model trains on."""

import dataclasses

import numpy as np
import pytest

from model.synth import (
    ANSWERS,
    COLOURS,
    QUESTION_KINDS,
    SHAPES,
    make_question,
    make_video,
    shape_mask,
    vocabulary,
    when_label,
)


def colour_pixels(frames: np.ndarray, colour: str, tol: float = 60.0) -> np.ndarray:
    """Pixels per frame within `tol` (RGB distance) of an event colour: [F]."""
    dist = np.linalg.norm(frames.astype(np.float32) - np.float32(COLOURS[colour]), axis=-1)
    return (dist < tol).sum(axis=(1, 2))


def test_same_seed_same_video_and_questions():
    a, b = make_video(11, 40), make_video(11, 40)
    assert a == b
    np.testing.assert_array_equal(a.frames(), b.frames())
    qa = [make_question(a, np.random.default_rng(5)) for _ in range(3)]
    qb = [make_question(b, np.random.default_rng(5)) for _ in range(3)]
    assert qa == qb
    c = make_video(12, 40)
    assert c != a and not np.array_equal(c.frames(), a.frames())


@pytest.mark.parametrize("seed", range(6))
def test_needle_is_on_screen_exactly_where_the_question_says(seed):
    video = make_video(seed, 48)
    frames = video.frames((32, 32))
    hits = colour_pixels(frames, video.needle.colour)
    needle = set(video.needle.frames)
    # The needle colour is on screen in the needle frames, and nowhere else: the
    # background is muted and distractors never share the needle's colour.
    assert all(hits[i] >= 20 for i in needle), hits
    assert all(hits[i] == 0 for i in range(len(frames)) if i not in needle), hits
    # Distractors don't share the needle's shape or colour, and events never overlap.
    for d in video.distractors:
        assert d.shape != video.needle.shape and d.colour != video.needle.colour
    busy = [i for e in video.events for i in e.frames]
    assert len(busy) == len(set(busy))
    # Only event frames differ from the background alone.
    plain = dataclasses.replace(video, needle=dataclasses.replace(video.needle, start=-10), distractors=())
    changed = np.nonzero(np.abs(frames.astype(int) - plain.frames((32, 32)).astype(int)).max(axis=(1, 2, 3)))[0]
    assert set(changed) == set(busy)


def test_questions_have_the_right_answers():
    rng = np.random.default_rng(0)
    seen = set()
    for seed in range(40):
        video = make_video(seed, 90)
        n = video.needle
        for kind in QUESTION_KINDS:
            q = make_question(video, rng, kind)
            seen.add((kind, q.answer))
            assert q.answer in ANSWERS and q.needle_frames == tuple(n.frames)
            assert set(q.text.split()) <= set(vocabulary())
            if kind == "colour":
                assert q.answer == n.colour and n.shape in q.text
            elif kind == "shape":
                assert q.answer == n.shape and n.colour in q.text
            elif kind == "exists":
                colour = q.text.split()[3]
                on_screen = any(e.colour == colour and e.shape == n.shape for e in video.events)
                assert (q.answer == "yes") == on_screen
            else:
                # The needle lies inside one third of the video, so the label is clear.
                labels = {when_label(i, video.num_frames) for i in n.frames}
                assert labels == {q.answer}
    assert ("exists", "no") in seen and ("exists", "yes") in seen
    assert {a for k, a in seen if k == "when"} == {"beginning", "middle", "end"}


def test_shapes_are_distinct_pictures():
    yy, xx = np.meshgrid(np.linspace(-0.5, 0.5, 64), np.linspace(-0.5, 0.5, 64), indexing="ij")
    masks = {s: shape_mask(s, xx, yy, 0.3) for s in SHAPES}
    for s in SHAPES:
        assert masks[s].sum() > 200
        for o in SHAPES:
            if o != s:
                assert (masks[s] != masks[o]).sum() > 60, (s, o)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_frames"):
        make_video(0, 0)
    with pytest.raises(ValueError, match="hexagon"):
        shape_mask("hexagon", np.zeros(1), np.zeros(1), 0.1)
    with pytest.raises(ValueError, match="kind"):
        make_question(make_video(0, 8), np.random.default_rng(0), "how many")
    with pytest.raises(ValueError, match="even"):
        make_video(0, 4).write_h264("/tmp/never.mp4", size=(33, 32))


def test_h264_file_decodes_to_the_in_memory_frames(tmp_path):
    from pipeline.decode import decode_frames
    from pipeline.probe import probe

    video = make_video(3, 30)
    path = video.write_h264(tmp_path / "needle.mp4", size=(64, 64))
    info = probe(path)
    assert info.duration == pytest.approx(video.duration, abs=0.6)
    decoded = decode_frames(path, video.times(), size=(32, 32))
    assert decoded.frames.shape == (30, 32, 32, 3) and decoded.lost == 0
    np.testing.assert_allclose(decoded.pts, video.times(), atol=1e-6)  # the exact picture, not a neighbour
    ref = video.frames((32, 32)).astype(np.float32)
    diff = np.abs(decoded.frames.astype(np.float32) - ref)
    # H.264 at crf 18 + chroma subsampling + the decoder's resize: small on average,
    # and the needle keeps its colour in its frames only.
    assert diff.mean() < 6.0, diff.mean()
    hits = colour_pixels(decoded.frames, video.needle.colour)
    assert all(hits[i] >= 10 for i in video.needle.frames)
    assert all(hits[i] == 0 for i in range(30) if i not in video.needle.frames)


def test_tiny_vocabulary_covers_every_question_and_answer():
    from model.tiny import VOCAB_FILE

    vocab = set(VOCAB_FILE.read_text().split())
    assert set(vocabulary()) <= vocab, set(vocabulary()) - vocab
