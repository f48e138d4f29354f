"""Content moderation of requests, before they are dispatched: an operator's rules file and/or an upstream.

The gateway asks ``Moderator.check`` about a request's text (``texts_of`` pulls it out of a chat or
completions body, which also covers an arena turn or a batch line) before a job is queued, when the
operator enabled moderation. Two sources, either or both:

* a **rules file** (``parse_rules``): words, phrases and regexes, checked first because they are cheap;
* an **OpenAI-compatible upstream** ``/v1/moderations`` endpoint, called once per check with
  ``{"input": texts}``.

A flagged request becomes OpenAI's 400 ``content_filter`` error (``refusal``). Neither the verdict nor
the refusal quotes the user's text back: a reason names a rule's line or an input's index, never the
words that matched.

The upstream **fails closed**: when the operator asked for moderation, a request is never let through
unchecked. A timeout, a connection error, a non-2xx answer or a body that is not OpenAI's moderation
shape is a 503 ``moderation_unavailable`` ``ServeError`` (with ``Retry-After``), not a pass.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx

from broker.errors import ServeError

#: The category of a rule that names none.
DEFAULT_CATEGORY = "rules"
#: ``[category] rule``: a rule's optional category prefix.
_CATEGORY = re.compile(r"^\[([^\]]*)\]\s*(.*)$")


@dataclass(frozen=True)
class Verdict:
    """Why a request was flagged: its categories, which source said so, and a reason safe to log."""

    categories: list[str]
    source: Literal["rules", "upstream"]
    reason: str


@dataclass(frozen=True)
class Rule:
    """One line of a rules file, compiled: a case-insensitive pattern and its category."""

    pattern: re.Pattern[str]
    category: str
    line: int


# --- the rules file -------------------------------------------------------------------------------------------


def load_rules(path: str | Path) -> list[Rule]:
    """The rules of a UTF-8 file (see ``parse_rules``); a missing or unreadable file is a ValueError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"moderation rules file {str(path)!r} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise ValueError(f"cannot read moderation rules file {str(path)!r}: {e.strerror or e}") from None
    return parse_rules(text, source=str(path))


def parse_rules(text: str, source: str = "<rules>") -> list[Rule]:
    """Compile a rules file: one rule a line; blank lines and lines starting with ``#`` are ignored.

    ``re:<regex>`` is a Python regex; any other line is a word or phrase, matched on word boundaries
    (``ass`` does not flag ``class``) with any run of whitespace between its words. Either may start
    with ``[category] `` (default ``rules``). All matching is case-insensitive. A bad regex, a regex that
    matches the empty string (it would flag every request) or a file with no rules at all is a
    ValueError naming ``source`` and the line.
    """
    rules = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            rules.append(_parse_line(line, number, source))
    if not rules:
        raise ValueError(f"moderation rules file {source!r} holds no rules")
    return rules


def _parse_line(line: str, number: int, source: str) -> Rule:
    where = f"moderation rules file {source!r}, line {number}"
    category = DEFAULT_CATEGORY
    if m := _CATEGORY.match(line):
        category, line = m.group(1).strip(), m.group(2).strip()
        if not category:
            raise ValueError(f"{where}: empty category '[]'")
        if not line:
            raise ValueError(f"{where}: category [{category}] with no rule after it")
    if line.startswith("re:"):
        return Rule(_compile_regex(line[3:], where), category, number)
    words = r"\s+".join(re.escape(w) for w in line.split())
    return Rule(re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE), category, number)


def _compile_regex(source: str, where: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(source, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"{where}: bad regex: {e}") from None
    if pattern.search(""):
        raise ValueError(f"{where}: the regex matches the empty string, so it would flag every request")
    return pattern


def _check_rules(rules: list[Rule], texts: list[str]) -> Verdict | None:
    hits = [rule for rule in rules if any(rule.pattern.search(t) for t in texts)]
    if not hits:
        return None
    categories = list(dict.fromkeys(rule.category for rule in hits))
    lines = ", ".join(str(rule.line) for rule in hits[:5]) + (", ..." if len(hits) > 5 else "")
    return Verdict(categories, "rules", f"matched rules file line(s) {lines}")


# --- the upstream ---------------------------------------------------------------------------------------------


class _Unavailable(Exception):
    """The upstream gave no usable answer; becomes the 503."""


class _Upstream:
    """An OpenAI-compatible ``/v1/moderations`` endpoint, through a client this object owns."""

    def __init__(self, url: str, api_key: str | None, timeout: float, model: str | None) -> None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as e:
            raise ValueError(f"moderation upstream URL {url!r} is not a URL: {e}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"moderation upstream URL must be an http(s) URL, got {url!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url, self.model, self.timeout = url, model, timeout
        self.client = httpx.AsyncClient(headers=headers, timeout=timeout, follow_redirects=False)

    async def check(self, texts: list[str]) -> Verdict | None:
        payload: dict[str, Any] = {"input": texts}
        if self.model:
            payload["model"] = self.model
        try:
            results = await self._post(payload)
            return _upstream_verdict(_read_results(results, len(texts)))
        except _Unavailable as e:
            raise ServeError(f"Moderation is unavailable: {e}", status=503, code="moderation_unavailable") from None

    async def _post(self, payload: dict[str, Any]) -> Any:
        """The answer's JSON; one deadline over the whole exchange, not per read."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.client.post(self.url, json=payload)
                body = await response.aread()
        except (TimeoutError, httpx.TimeoutException):
            raise _Unavailable(f"the upstream did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as e:
            raise _Unavailable(f"cannot reach the upstream ({type(e).__name__})") from None
        if not response.is_success:
            raise _Unavailable(f"the upstream answered HTTP {response.status_code}")
        try:
            return json.loads(body)
        except ValueError:
            raise _Unavailable("the upstream's answer is not JSON") from None

    async def aclose(self) -> None:
        await self.client.aclose()


def _read_results(payload: Any, n: int) -> list[dict[str, Any]]:
    """``results`` of OpenAI's moderation answer, one per input, each with a boolean ``flagged``."""
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list) or len(results) != n:
        raise _Unavailable(f"the upstream's answer does not hold {n} result(s)")
    for result in results:
        if not isinstance(result, dict) or not isinstance(result.get("flagged"), bool):
            raise _Unavailable("the upstream's answer has a result without a boolean 'flagged'")
        if not isinstance(result.get("categories", {}), dict):
            raise _Unavailable("the upstream's answer has a result whose 'categories' is not an object")
    return results


def _upstream_verdict(results: list[dict[str, Any]]) -> Verdict | None:
    flagged = [i for i, r in enumerate(results) if r["flagged"]]
    if not flagged:
        return None
    categories = dict.fromkeys(k for i in flagged for k, v in results[i].get("categories", {}).items() if v is True)
    which = ", ".join(map(str, flagged))
    return Verdict(list(categories), "upstream", f"upstream moderation flagged input(s) {which} of {len(results)}")


# --- the moderator --------------------------------------------------------------------------------------------


class Moderator:
    """Checks a request's texts against the rules (first, cheap), then the upstream; see the module docstring.

    Fails closed: with an upstream configured, ``check`` raises a 503 ``moderation_unavailable``
    ``ServeError`` whenever the upstream cannot give a verdict, so nothing passes unchecked.
    Owns an ``httpx.AsyncClient`` when it has an upstream: ``aclose()`` it (or use ``async with``).
    """

    def __init__(self, rules: Iterable[Rule] = (), upstream_url: str | None = None, *,
                 api_key: str | None = None, timeout: float = 5.0, model: str | None = None) -> None:
        self.rules = list(rules)
        self._upstream = _Upstream(upstream_url, api_key, timeout, model) if upstream_url else None

    @classmethod
    def from_settings(cls, rules_path: str | None, upstream_url: str | None, api_key: str | None = None,
                      timeout: float = 5.0, *, model: str | None = None) -> Moderator:
        """A moderator from the operator's settings; an empty string counts as not given.

        ValueError (for startup to report) when neither source is given, the rules file cannot be loaded,
        or the upstream URL is not an http(s) URL.
        """
        if not rules_path and not upstream_url:
            raise ValueError("moderation needs a rules file, an upstream URL, or both")
        if timeout <= 0:
            raise ValueError(f"moderation timeout must be positive, got {timeout}")
        rules = load_rules(rules_path) if rules_path else []
        return cls(rules, upstream_url or None, api_key=api_key, timeout=timeout, model=model)

    async def check(self, texts: list[str]) -> Verdict | None:
        """None when the texts are clean, else the ``Verdict``; a 503 ``ServeError`` when the upstream fails."""
        texts = [t for t in texts if t]
        if not texts:
            return None
        if verdict := _check_rules(self.rules, texts):
            return verdict
        return await self._upstream.check(texts) if self._upstream else None

    async def screen(self, texts: list[str], param: str | None) -> None:
        """Raise the 400 ``content_filter`` refusal if the texts are flagged (and the 503 if it cannot tell)."""
        if verdict := await self.check(texts):
            raise refusal(verdict, param=param)

    async def aclose(self) -> None:
        if self._upstream:
            await self._upstream.aclose()

    async def __aenter__(self) -> Moderator:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def refusal(verdict: Verdict, *, param: str | None = None) -> ServeError:
    """OpenAI's 400 ``content_filter`` error for a flagged request; it never quotes the flagged text.

    ``param`` is the field that carried the text (``"messages"`` for chat, ``"prompt"`` for completions).
    """
    categories = f" (categories: {', '.join(verdict.categories)})" if verdict.categories else ""
    return ServeError(f"The request was flagged by moderation{categories}.", status=400,
                      type="invalid_request_error", code="content_filter", param=param)


# --- request bodies -------------------------------------------------------------------------------------------


def texts_of(body: dict[str, Any]) -> list[str]:
    """The user-visible text of a chat (``messages[].content``) or completions (``prompt``) body.

    Content may be a string or a list of parts (the ``text`` of ``type: "text"`` parts); a prompt may be
    a string or a list of strings. Token-id prompts carry no text to moderate and are skipped, as is
    anything not of these shapes (the body is validated elsewhere).
    """
    texts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                texts.extend(_content_texts(message.get("content")))
    texts.extend(_prompt_texts(body.get("prompt")))
    return texts


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [p["text"] for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]


def _prompt_texts(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [p for p in prompt if isinstance(p, str)]
    return []
