"""Object keys are built only from hashes: nothing a user names (a file name, a URI, a
path with '..') can reach a key (pipeline.store.window_key / video_prefix / check_hex_id).

The reference for "a hash" here is written out by hand (characters from '0123456789abcdef',
8..64 of them), not taken from the store's own regex.
"""

from __future__ import annotations

import random
import re

import pytest

from pipeline.store import check_hex_id, video_prefix, window_key

KEY = re.compile(r"^objects/[0-9a-f]+/[0-9a-f]{2}/[0-9a-f]+/w\d{6}\.safetensors$")
GOOD = "0123456789abcdef" * 4  # 64 hex chars

HOSTILE = [
    "", "../../etc/passwd", "..", "deadbeef/..", "dead/beef", "/deadbeef", "deadbeef/", "dead\\beef",
    "dead beef", " deadbeef", "deadbeef ", "deadbeef\n", "deadbeef\x00", "\tdeadbeef",
    "DEADBEEF", "DeadBeef", "deadbeeg", "0xdeadbeef", "dead-beef", "dead.beef", "deadbeef.mp4",
    "clip_000.mp4", "my video.mp4", "s3://bucket/deadbeef", "file:///deadbeef", "http://x/deadbeef",
    "٠١٢٣٤٥٦٧",  # Arabic-Indic digits: \d would take them
    "ｄｅａｄｂｅｅｆ", "déadbeef", "deadbeef\u200b", "ﬀﬀﬀﬀﬀﬀﬀﬀ", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕",
    "abc1234", GOOD + "0", "%2e%2e%2fdeadbeef", "deadbeef;rm -rf", "*", "deadbeef*",
]
NOT_STR = [None, 12345678, 0xDEADBEEF, b"deadbeef", bytearray(b"deadbeef"), ["deadbeef"], 1.5]


def is_hash(value) -> bool:
    return isinstance(value, str) and 8 <= len(value) <= 64 and all(c in "0123456789abcdef" for c in value)


@pytest.mark.parametrize("bad", HOSTILE + NOT_STR, ids=repr)
def test_non_hex_ids_are_refused_everywhere(bad):
    assert not is_hash(bad)
    with pytest.raises(ValueError, match="video_id must be a lowercase hex hash"):
        check_hex_id(bad, "video_id")
    for make in (lambda v: video_prefix(v, GOOD), lambda v: video_prefix(GOOD, v),
                 lambda v: window_key(v, GOOD, 0), lambda v: window_key(GOOD, v, 0)):
        with pytest.raises(ValueError, match="must be a lowercase hex hash"):
            make(bad)


@pytest.mark.parametrize("index", [-1, 1_000_000, True, False, 1.0, "1", "000001", None, 2**70])
def test_bad_window_indexes_are_refused(index):
    with pytest.raises(ValueError, match="window index must be an int in 0..999999"):
        window_key(GOOD[:16], GOOD[:32], index)


def _random_string(rng: random.Random, pool: str = "0123456789abcdefABCDEF./\\ -_:%~\x00\n\t٠éｆ𝟎") -> str:
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 70)))


def test_random_ids_give_keys_of_the_pattern_and_nothing_else():
    """Property: hex ids of any allowed length and any index give a key of the fixed
    pattern made of exactly those parts; any other string is refused."""
    rng = random.Random(20240601)
    for _ in range(3000):
        fp = "".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(8, 64)))
        vid = "".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(8, 64)))
        index = rng.choice([0, 999_999, rng.randint(0, 999_999)])
        key = window_key(fp, vid, index)
        assert KEY.fullmatch(key), key
        assert key.split("/") == ["objects", fp, vid[:2], vid, f"w{index:06d}.safetensors"]
        assert key.startswith(video_prefix(fp, vid))
    accepted = refused = 0
    for _ in range(3000):
        s = _random_string(rng) if rng.random() < 0.8 else _random_string(rng, "0123456789abcdef")
        if is_hash(s):
            assert KEY.fullmatch(window_key(s, s, 7))
            accepted += 1
        else:
            with pytest.raises(ValueError):
                window_key(s, GOOD, 7)
            refused += 1
    assert accepted > 100 and refused > 100  # both sides of the property were exercised
