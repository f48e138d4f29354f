"""Token ids to text: deltas that never split a character."""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a character.

    Byte-level tokens may hold part of a UTF-8 character; text is released
    only once it decodes without a trailing replacement character. A fast
    tokenizer decodes through ``tokenizers``' own ``DecodeStream`` (about a
    microsecond a token); any other, or one whose ``decode`` cleans up spaces
    afterwards (which ``DecodeStream`` does not), decodes a short window
    (``prefix``) twice a token, which keeps each step O(1) and lets tokenizers
    that depend on the left context (leading spaces) decode correctly. The
    window is also where a ``DecodeStream`` hands over when it refuses a
    sequence: with byte-fallback tokens (Llama 2, Mistral), a byte that makes
    an earlier run undecodable raises there, where the window decodes it to
    replacement characters.
    """

    def __init__(self, tokenizer: Any, *, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream: tuple[DecodeStream, Any] | None = None
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._stream = DecodeStream(skip_special_tokens=skip_special), backend

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self._stream is not None:
            stream, backend = self._stream
            try:
                text = stream.step(backend, token)
            except Exception:  # tokenizers raises a bare Exception ("Invalid prefix"): the window from here on
                self._stream = None
            else:
                if text is None:  # part of a character: held back until the rest arrives (or flush)
                    return ""
                self.prefix, self.read = self.read, len(self.ids)
                return text
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
