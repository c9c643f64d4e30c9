"""Turning a stream of tokens into a stream of text: whole UTF-8 characters, cut at stop strings.

Written here because it sits between llama.cpp's per-token bytes and the request's stop strings,
which no library joins: a token can end in the middle of a UTF-8 character, and a stop string can
span tokens, so text that might be the start of a stop string is held back until it is not.
"""

from __future__ import annotations

import codecs


class TextStream:
    """Feed token bytes in; get out the text that is safe to show, and whether a stop string was hit."""

    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False
        self.stop_word: str | None = None  # the stop string that ended the text

    def feed(self, piece: bytes) -> str:
        text = self._held + self._decoder.decode(piece)
        found = [(i, s) for s in self._stop if (i := text.find(s)) >= 0]
        if found:
            cut, self.stop_word = min(found)
            self._held, self.stopped = "", True
            return text[:cut]
        keep = max((n for s in self._stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What is held back, at the end of the stream."""
        text, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return text
