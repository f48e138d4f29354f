"""Token ids to text: deltas that never split a character."""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a character.

    Byte-level tokens may hold part of a UTF-8 character; text is released
    only once it decodes without a trailing replacement character. Decoding
    from a short window (``prefix``) keeps each step O(1) and lets tokenizers
    that depend on the left context (leading spaces) decode correctly.
    """

    def __init__(self, tokenizer: Any, *, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is left, even an incomplete character, once the sequence ended."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(seen) and (final or not text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(seen):]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special) if ids else ""

