"""Tokens' bytes to text: whole UTF-8 characters, cut at stop strings that may span tokens."""

from __future__ import annotations

from runtime.engine.text import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.feed(piece) for piece in pieces]


def test_a_character_split_across_tokens_comes_out_whole() -> None:
    stream = TextStream([])
    assert feed_all(stream, [b"caf", b"\xc3", b"\xa9 \xe2\x82", b"\xac"]) == ["caf", "", "é ", "€"]
    assert stream.flush() == ""


def test_a_stop_string_spanning_tokens_cuts_the_text_before_it() -> None:
    stream = TextStream(["</answer>"])
    assert feed_all(stream, [b"42 is it", b"</ans", b"wer> and more"]) == ["42 is it", "", ""]
    assert stream.stopped


def test_held_back_text_that_was_no_stop_string_comes_out() -> None:
    stream = TextStream(["STOP"])
    assert feed_all(stream, [b"ST", b"ART"]) == ["", "START"]
    assert not stream.stopped
    assert stream.feed(b" ST") == " " and stream.flush() == "ST"  # the end of the answer: nothing is lost


def test_the_earliest_of_several_stop_strings_wins() -> None:
    stream = TextStream(["b", "a"])
    assert stream.feed(b"xxabyy") == "xx" and stream.stopped


def test_the_stop_string_that_ended_the_text_is_named() -> None:
    stream = TextStream(["###", "END"])
    assert stream.feed(b"one EN") == "one "
    assert stream.stop_word is None
    assert stream.feed(b"D ### more") == ""
    assert stream.stopped and stream.stop_word == "END"
