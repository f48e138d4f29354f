"""gateway/moderation.py: the rules file, a real upstream ``/v1/moderations`` server on loopback, request texts.

The upstream is a small Starlette app served by uvicorn on a free 127.0.0.1 port, answering in
OpenAI's moderation shape; nothing of httpx is mocked.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from support import serving

from broker.errors import ServeError
from gateway.moderation import Moderator, Verdict, parse_rules, refusal, texts_of

CATEGORIES = ("harassment", "hate", "violence")


# --- a real upstream ------------------------------------------------------------------------------------------


@dataclass
class Upstream:
    url: str
    requests: list[tuple[dict[str, str], Any]] = field(default_factory=list)

    def endpoint(self, prefix: str = "") -> str:
        return f"{self.url}{prefix}/v1/moderations"


def _result(text: str) -> dict[str, Any]:
    flagged = "FLAGME" in text
    return {"flagged": flagged,
            "categories": {c: flagged and c in ("harassment", "violence") for c in CATEGORIES},
            "category_scores": {c: 0.9 if flagged else 0.01 for c in CATEGORIES}}


def _app(seen: list[tuple[dict[str, str], Any]]) -> Starlette:
    async def moderations(request: Request) -> Response:
        body = await request.json()
        seen.append((dict(request.headers), body))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return JSONResponse({"id": "modr-1", "model": body.get("model", "omni-moderation-latest"),
                             "results": [_result(t) for t in inputs]})

    async def broken(request: Request) -> Response:
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    async def garbage(request: Request) -> Response:
        return PlainTextResponse("this is not json")

    async def short(request: Request) -> Response:
        return JSONResponse({"id": "modr-2", "model": "m", "results": []})

    async def slow(request: Request) -> Response:
        await asyncio.sleep(1.0)
        return JSONResponse({"id": "modr-3", "model": "m", "results": [_result("")]})

    return Starlette(routes=[Route(f"{prefix}/v1/moderations", fn, methods=["POST"])
                             for prefix, fn in [("", moderations), ("/broken", broken), ("/garbage", garbage),
                                                ("/short", short), ("/slow", slow)]])


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    seen: list[tuple[dict[str, str], Any]] = []
    config = uvicorn.Config(_app(seen), host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task, port = await serving(server)
    yield Upstream(f"http://127.0.0.1:{port}", seen)
    server.should_exit = True
    await task


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rules_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "rules.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


RULES = """\
# words and phrases, on word boundaries
ass
kill you

[slurs] badword
[spam] re:fr[e3]{2}\\s*m[o0]ney
   # an indented comment
re:\\bcredit\\s+card\\s+\\d{4}
[Violence] KILL YOU
"""


@pytest.fixture
async def rules_moderator(tmp_path: Path) -> AsyncIterator[Moderator]:
    async with Moderator.from_settings(_rules_file(tmp_path, RULES), None) as m:
        yield m


# --- the rules file -------------------------------------------------------------------------------------------


async def test_clean_text_passes(rules_moderator: Moderator) -> None:
    assert await rules_moderator.check(["Hello there", "a perfectly fine question"]) is None
    assert await rules_moderator.check([]) is None
    assert await rules_moderator.check([""]) is None


@pytest.mark.parametrize("text", ["you ass", "ASS!", "(Ass)", "ass"])
async def test_words_match_case_insensitively(rules_moderator: Moderator, text: str) -> None:
    verdict = await rules_moderator.check(["fine", text])
    assert verdict == Verdict(["rules"], "rules", "matched rules file line(s) 2")


@pytest.mark.parametrize("text", ["a class act", "passage", "assess", "bass guitar", "asses", "kill your darlings",
                                  "skill you have", "badwords"])
async def test_words_match_on_word_boundaries_only(rules_moderator: Moderator, text: str) -> None:
    assert await rules_moderator.check([text]) is None


async def test_phrases_allow_any_whitespace_between_words(rules_moderator: Moderator) -> None:
    for text in ["I will kill you", "KILL\n  You now", "kill\tyou."]:
        verdict = await rules_moderator.check([text])
        assert verdict is not None and verdict.categories == ["rules", "Violence"], text
        assert verdict.reason == "matched rules file line(s) 3, 9"


async def test_regexes_are_case_insensitive_and_not_bounded(rules_moderator: Moderator) -> None:
    verdict = await rules_moderator.check(["get FR33 M0NEY now", "x"])
    assert verdict == Verdict(["spam"], "rules", "matched rules file line(s) 6")
    assert await rules_moderator.check(["my Credit Card 1234 5678"]) == Verdict(
        ["rules"], "rules", "matched rules file line(s) 8")
    assert await rules_moderator.check(["freemoney"]) is not None  # a regex is matched as written: no \b added
    assert await rules_moderator.check(["creditcard 1234"]) is None


async def test_categories_gather_across_texts(rules_moderator: Moderator) -> None:
    verdict = await rules_moderator.check(["BadWord here", "and free money", "and an ass"])
    assert verdict is not None
    assert verdict.source == "rules"
    assert verdict.categories == ["rules", "slurs", "spam"]


async def test_a_verdict_never_quotes_the_text(rules_moderator: Moderator) -> None:
    secret = "my credit card 4242 is here, BADWORD"
    verdict = await rules_moderator.check([secret])
    assert verdict is not None
    for piece in ("4242", "credit", "badword", "BADWORD"):
        assert piece not in verdict.reason
        assert piece not in refusal(verdict).message


def test_comments_and_blank_lines_are_skipped() -> None:
    rules = parse_rules("# only\n\n  \nword\n# another\n[c] re:x+y\n")
    assert [(r.line, r.category) for r in rules] == [(4, "rules"), (6, "c")]


def test_a_bad_regex_names_its_line(tmp_path: Path) -> None:
    path = _rules_file(tmp_path, "# header\nfine\nre:(unclosed\n")
    with pytest.raises(ValueError, match=r"rules\.txt', line 3: bad regex"):
        Moderator.from_settings(path, None)
    with pytest.raises(ValueError, match="line 2: bad regex"):
        parse_rules("ok\n[cat] re:[z-a]\n")


@pytest.mark.parametrize("text, problem", [
    ("re:a*\n", "line 1: the regex matches the empty string"),
    ("re:\n", "line 1: the regex matches the empty string"),
    ("ok\n[] word\n", "line 2: empty category"),
    ("[spam]\n", "line 1: category \\[spam\\] with no rule"),
    ("# nothing but comments\n\n", "holds no rules"),
])
def test_unusable_rules_are_refused_at_load(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_rules(text)


def test_load_errors_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read moderation rules file"):
        Moderator.from_settings(str(tmp_path / "missing.txt"), None)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="is not UTF-8"):
        Moderator.from_settings(str(tmp_path / "latin1.txt"), None)
    with pytest.raises(ValueError, match="a rules file, an upstream URL, or both"):
        Moderator.from_settings(None, None)
    with pytest.raises(ValueError, match="http\\(s\\) URL"):
        Moderator.from_settings(None, "ftp://example.invalid/v1/moderations")


def test_unicode_rules_match_case_insensitively() -> None:
    [rule] = parse_rules("übel\n")
    assert rule.pattern.search("das ist ÜBEL!")
    assert not rule.pattern.search("Übelkeit")


# --- the upstream ---------------------------------------------------------------------------------------------


async def test_upstream_flags_an_input(upstream: Upstream) -> None:
    async with Moderator.from_settings(None, upstream.endpoint(), api_key="sk-test") as m:
        verdict = await m.check(["hello", "please FLAGME now"])
    assert verdict == Verdict(["harassment", "violence"], "upstream", "upstream moderation flagged input(s) 1 of 2")
    [(headers, body)] = upstream.requests
    assert body == {"input": ["hello", "please FLAGME now"]}  # OpenAI's request shape; no model unless configured
    assert headers["authorization"] == "Bearer sk-test"


async def test_upstream_passes_a_clean_input(upstream: Upstream) -> None:
    async with Moderator.from_settings(None, upstream.endpoint(), model="omni-moderation-latest") as m:
        assert await m.check(["hello", "how are you"]) is None
    [(headers, body)] = upstream.requests
    assert body == {"input": ["hello", "how are you"], "model": "omni-moderation-latest"}
    assert "authorization" not in headers


async def test_rules_are_checked_before_the_upstream(upstream: Upstream, tmp_path: Path) -> None:
    async with Moderator.from_settings(_rules_file(tmp_path, "[local] badword\n"), upstream.endpoint()) as m:
        assert await m.check(["a BADWORD and FLAGME"]) == Verdict(["local"], "rules", "matched rules file line(s) 1")
        assert upstream.requests == []  # the rules said no: the upstream was never asked
        verdict = await m.check(["only FLAGME"])
        assert verdict is not None and verdict.source == "upstream"
        assert await m.check(["fine"]) is None
        assert await m.check([]) is None
    assert len(upstream.requests) == 2  # once per check that reached it; none for nothing to check


async def _assert_unavailable(url: str, detail: str, timeout: float = 5.0) -> None:
    async with Moderator.from_settings(None, url, timeout=timeout) as m:
        with pytest.raises(ServeError) as caught:
            await m.check(["hello FLAGME"])
    err = caught.value
    assert (err.status, err.code, err.type) == (503, "moderation_unavailable", "service_unavailable")
    assert detail in err.message
    assert err.headers == {"Retry-After": "1"}
    assert err.body()["error"]["code"] == "moderation_unavailable"
    assert "FLAGME" not in err.message


async def test_an_upstream_500_fails_closed(upstream: Upstream) -> None:
    await _assert_unavailable(upstream.endpoint("/broken"), "HTTP 500")


async def test_an_upstream_answer_that_is_not_json_fails_closed(upstream: Upstream) -> None:
    await _assert_unavailable(upstream.endpoint("/garbage"), "not JSON")


async def test_an_upstream_answer_of_the_wrong_shape_fails_closed(upstream: Upstream) -> None:
    await _assert_unavailable(upstream.endpoint("/short"), "does not hold 1 result")


async def test_an_unknown_upstream_path_fails_closed(upstream: Upstream) -> None:
    await _assert_unavailable(upstream.endpoint("/nowhere"), "HTTP 404")


async def test_a_slow_upstream_fails_closed(upstream: Upstream) -> None:
    await _assert_unavailable(upstream.endpoint("/slow"), "did not answer within 0.2 s", timeout=0.2)


async def test_an_unreachable_upstream_fails_closed() -> None:
    await _assert_unavailable(f"http://127.0.0.1:{_closed_port()}/v1/moderations", "cannot reach the upstream")


# --- refusal and request texts --------------------------------------------------------------------------------


def test_refusal_is_openais_content_filter_400() -> None:
    err = refusal(Verdict(["harassment", "violence"], "upstream", "upstream moderation flagged input(s) 0 of 1"),
                  param="messages")
    assert err.status == 400
    assert err.headers is None
    assert err.body() == {"error": {
        "message": "The request was flagged by moderation (categories: harassment, violence).",
        "type": "invalid_request_error", "param": "messages", "code": "content_filter"}}
    bare = refusal(Verdict([], "upstream", "flagged")).body()["error"]
    assert bare["message"] == "The request was flagged by moderation."
    assert (bare["param"], bare["code"]) == (None, "content_filter")


def test_texts_of_chat_bodies() -> None:
    body = {"model": "m", "messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": [{"type": "text", "text": "part one"},
                                     {"type": "image_url", "image_url": {"url": "http://x"}},
                                     {"type": "text", "text": "part two"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "tool_call_id": "c1", "content": "tool says"},
    ]}
    assert texts_of(body) == ["be nice", "part one", "part two", "tool says"]


@pytest.mark.parametrize("prompt, texts", [
    ("once upon a time", ["once upon a time"]),
    (["first", "second"], ["first", "second"]),
    ([1, 2, 3], []),
    ([[1, 2], [3]], []),
    (["text", [1, 2]], ["text"]),
])
def test_texts_of_completion_bodies(prompt: Any, texts: list[str]) -> None:
    assert texts_of({"model": "m", "prompt": prompt, "max_tokens": 4}) == texts


def test_texts_of_odd_bodies_is_empty() -> None:
    assert texts_of({}) == []
    assert texts_of({"messages": "not a list", "prompt": 7}) == []
    assert texts_of({"messages": [None, {"content": [None, {"type": "text", "text": 3}]}]}) == []
