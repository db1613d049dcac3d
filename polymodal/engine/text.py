"""Incremental detokenization with stop strings, for streaming answers piece by piece."""

from __future__ import annotations


class TextTracker:
    """Turns one sequence's token ids into text pieces as they come.

    A piece is held back while it could still become a stop string or while the last
    token ends inside a multi-byte character; a stop string ends the text before it.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly visible text (may be empty)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # the character is not complete yet
        for stop in self.stop:
            found = text.find(stop, max(0, self.emitted - len(stop)))
            if found != -1:
                text, self.stopped = text[:found], True
        self.text = text
        visible = len(text) if self.stopped else len(text) - self._held_back(text)
        piece = text[self.emitted : visible]
        self.emitted = max(self.emitted, visible)
        return piece

    def finish(self) -> str:
        """The rest of the text once the sequence has ended."""
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-size:]):
                    longest = size
                    break
        return longest
