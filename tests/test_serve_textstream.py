"""TextStream: incremental text that never splits a UTF-8 character, stop strings cut before the stop (also
across tokens), stop ids, and what is held back while a stop may still be forming. A byte-level tokenizer
(one token per byte) makes every multi-byte character span several tokens."""
from __future__ import annotations

import pytest

from ktjax.demo import demo_tokenizer
from ktjax.serve.textstream import REPLACEMENT, TextStream

TOK = demo_tokenizer()
TEXT = "naïve café — 日本語 ok 🙂 done"


def pieces(stream: TextStream, ids) -> list[str]:
    out = [stream.push(i) for i in ids]
    return out + [stream.finish()]


def test_every_piece_is_whole_characters_and_they_add_up():
    ids = TOK.tok.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) == len(TEXT.encode())  # one token per byte
    out = pieces(TextStream(TOK), ids)
    assert "".join(out) == TEXT
    assert not any(REPLACEMENT in p for p in out)


@pytest.mark.parametrize("stop, want", [("日本", "naïve café — "), ("é —", "naïve caf"),
                                        ("🙂", "naïve café — 日本語 ok "), ("zzz", TEXT),
                                        ("done", "naïve café — 日本語 ok 🙂 ")])
def test_stop_strings_cut_before_the_stop(stop, want):
    ids = TOK.tok.encode(TEXT, add_special_tokens=False).ids
    s = TextStream(TOK, stop_strings=[stop, "never"])
    out = pieces(s, ids)
    assert "".join(out) == want
    assert s.stopped == (stop in TEXT)
    if s.stopped:  # tokens after the stop are consumed no more
        assert s.tokens < len(ids) or stop == "done"


def test_text_that_may_begin_a_stop_is_held_back_then_released():
    s = TextStream(TOK, stop_strings=["abc"])
    ids = TOK.tok.encode("xab", add_special_tokens=False).ids
    assert [s.push(i) for i in ids] == ["x", "", ""]
    assert s.push(TOK.tok.encode("d", add_special_tokens=False).ids[0]) == "abd"


def test_stop_id_ends_without_its_text_and_releases_what_was_held():
    s = TextStream(TOK, stop_strings=["abc"], stop_ids=[TOK.token_id("!")])
    ids = TOK.tok.encode("xab!yz", add_special_tokens=False).ids
    out = pieces(s, ids)
    assert "".join(out) == "xab" and s.stopped and s.tokens == 4


def test_an_unfinished_character_is_flushed_at_the_end():
    ids = TOK.tok.encode("a🙂", add_special_tokens=False).ids[:-1]  # the emoji's last byte never came
    out = pieces(TextStream(TOK), ids)
    assert out[0] == "a" and all(p == "" for p in out[1:-1]) and out[-1].startswith(REPLACEMENT)
