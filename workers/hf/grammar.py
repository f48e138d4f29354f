"""Constrained decoding with xgrammar: compiled grammars (cached by the compiler), a matcher per sequence, and
one token bitmask applied to the batch's logits, so constrained and free sequences share one forward pass."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch
import xgrammar as xgr

from broker.protocol import Structured
from workers.errors import JobError

#: xgrammar prefixes its messages with a time and a C++ source location: not for users.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
#: xgrammar (0.2.9) writes a JSON string's characters with these classes. The first (length-bounded strings)
#: lets raw control characters through, and both let UTF-8-encoded surrogates (ED A0 80...) through: invalid
#: JSON, and text no decoder reads back. Both become the class JSON allows.
_STRING_CHARS = (r"[^\0-\x1f\"\\\r\n]", r"[^\"\\\r\n]")
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n\uD800-\uDFFF]"


class Grammars:
    """Compiles constraints for one tokenizer, each once: the last ``keep`` compiled grammars stay cached."""

    def __init__(self, tokenizer: Any, vocab_size: int, keep: int = 256) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # Its own cache would keep every schema ever seen: the bounded cache below is the only one.
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab_size = vocab_size
        self.keep = keep
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0

    def compile(self, constraint: Structured, param: str) -> xgr.CompiledGrammar:
        """The grammar of ``constraint`` (blocking); one that cannot be compiled is a 400 naming ``param``."""
        key = constraint.key()
        with self._lock:
            if (hit := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = self._compile(constraint, param)
        with self._lock:
            self.compiled += 1
            self._cache[key] = grammar
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, constraint: Structured, param: str) -> xgr.CompiledGrammar:
        kind, text = constraint.key()
        try:
            if kind == "json":
                return self.compiler.compile_grammar(json_schema_ebnf(text))
            if kind == "regex":
                return self.compiler.compile_regex(text)
            if kind == "choice":
                return self.compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in constraint.choice or []))
            if kind == "grammar":
                return self.compiler.compile_grammar(text)
            return self.compiler.compile_grammar(json_schema_ebnf('{"type": "object"}', strict=False))
        except (RuntimeError, ValueError) as exc:
            problem = _LOCATION.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise JobError(f"The {kind.replace('_', ' ')} constraint cannot be compiled: {problem}",
                           param=param, code="invalid_constraint") from exc


def json_schema_ebnf(schema: str, *, strict: bool = True) -> str:
    """The grammar of a JSON schema, compact (no free whitespace for a weak model to wander off in), and with
    every string kept to characters JSON allows unescaped. ``strict``: no properties the schema does not name
    (``json_object`` is any object: not strict)."""
    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict))
    for loose in _STRING_CHARS:
        ebnf = ebnf.replace(loose, _JSON_STRING_CHAR)
    return ebnf


def matcher(grammar: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    return xgr.GrammarMatcher(grammar)


class Masks:
    """One bitmask buffer for a batch: fill the rows of constrained sequences, mask their logits in one call."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, xgr.GrammarMatcher]]) -> None:
        """Mask ``logits`` (one row per sequence) where each ``(row, matcher)`` forbids a token."""
        if not rows:
            return
        if self.bitmask.shape[0] < logits.shape[0]:
            self.bitmask = xgr.allocate_token_bitmask(max(logits.shape[0], 2 * self.bitmask.shape[0]),
                                                      self.vocab_size)
        for row, m in rows:
            m.fill_next_token_bitmask(self.bitmask, row)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask[:logits.shape[0]].to(logits.device),
                                        vocab_size=self.vocab_size, indices=[row for row, _ in rows])
