"""The arena, the leaderboard and chat feedback in a real browser (Debian's Chromium, headless, Playwright)
against a live gateway, Redis and echo workers.

The battle test records every network response the page gets before the vote (bodies included, the SSE
streams read whole once they end) and checks that none of them, nor the page, names a model until the
vote reveals both. With REDSERVE_SCREENSHOT=1 it also saves docs/arena.png for the README.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from playwright.async_api import Page, Response, expect

# The browser fixtures are test_ui's: the same Chromium, the same fresh page that fails on script errors.
from test_ui import browser, chromium, page, screenshot  # noqa: F401

from workers.echo import echo_tokens

pytestmark = pytest.mark.timeout(900)

MODELS = ("alpha-model", "beta-model")
DOCS = Path(__file__).resolve().parent.parent / "docs"
TOKENS = 12


async def arena_stack(stack):  # noqa: ANN001, ANN201
    for name in MODELS:
        await stack.worker([name], worker_id=f"w-{name}", echo_delay=0.04, echo_tokens=TOKENS)
    return await stack.gateway()


def responses_of(page: Page) -> list[Response]:  # noqa: F811
    """Every response the page receives from now on, in order."""
    seen: list[Response] = []
    page.on("response", lambda response: seen.append(response))
    return seen


async def transcripts(responses: list[Response]) -> list[str]:
    """URL, headers and whole body of each response (an SSE stream's body is complete once it has ended)."""
    out = []
    for r in responses:
        body = await r.body()
        out.append(f"{r.url}\n{json.dumps(await r.all_headers())}\n{body.decode('utf-8', 'replace')}")
    return out


async def page_text(page: Page) -> str:  # noqa: F811
    """What the page shows and what its DOM holds, hidden parts included."""
    return await page.evaluate("document.body.innerText") + "\n" + await page.content()


async def wait_replies(page: Page, count: int) -> None:  # noqa: F811
    """Both panes hold `count` finished replies."""
    for side in "ab":
        replies = page.locator(f"#arena-{side} .bubble.assistant")
        await expect(replies).to_have_count(count)
        await expect(replies.last).to_have_attribute("aria-busy", "false")


async def test_an_anonymous_battle_names_no_model_until_the_vote(stack, page, redis, keys):  # noqa: F811
    gw = await arena_stack(stack)
    responses = responses_of(page)
    await page.goto(f"{gw.url}/#arena")
    await expect(page.get_by_role("heading", name="Model A")).to_be_visible()
    await expect(page.get_by_role("button", name="A is better")).to_be_disabled()  # nothing to judge yet

    prompt = "which arena reply reads better"
    await page.get_by_label("Prompt for the battle").fill(prompt)
    await page.get_by_label("Prompt for the battle").press("Enter")
    # Both panes stream at once: each has text while both are still busy.
    await page.wait_for_function("""() => ['a', 'b'].every((side) => {
        const reply = document.querySelector('#arena-' + side + ' .bubble.assistant');
        return reply && reply.getAttribute('aria-busy') === 'true' && reply.textContent.trim().length > 0;
    })""")
    await wait_replies(page, 1)
    reply = "".join(echo_tokens(prompt, TOKENS))
    for side in "ab":
        await expect(page.locator(f"#arena-{side} .bubble.user .body")).to_have_text(prompt)
        await expect(page.locator(f"#arena-{side} .bubble.assistant .body")).to_have_text(reply)
    await expect(page.get_by_role("button", name="A is better")).to_be_enabled()

    await page.get_by_role("button", name="Regenerate").click()  # replaces the last replies on both sides
    await wait_replies(page, 1)
    await expect(page.locator("#arena-b .bubble.assistant .body")).to_have_text(reply)
    second = "and a second turn"
    await page.get_by_label("Prompt for the battle").fill(second)
    await page.get_by_role("button", name="Send").click()
    await wait_replies(page, 2)
    await expect(page.locator("#arena-a .bubble.assistant").last.locator(".body")).to_have_text(
        "".join(echo_tokens(second, TOKENS)))

    shown = await page_text(page)
    assert not any(name in shown for name in MODELS), "a model's name is on the page before the vote"
    before_vote = list(responses)
    seen = await transcripts(before_vote)
    streams = [t for t in seen if "/api/arena/battles/" in t.split("\n", 1)[0] and '"side": "a"' in t]
    assert len(streams) == 3, "the turns' and the regeneration's SSE bodies were read"
    assert all('"state": "open"' in t for t in streams)
    assert not any("/v1/models" in t.split("\n", 1)[0] for t in seen)  # the arena never lists the models
    for transcript in seen:
        assert not any(name.lower() in transcript.lower() for name in MODELS), transcript[:2000]

    async with page.expect_response(lambda r: r.url.endswith("/vote")) as voted:
        await page.get_by_role("button", name="A is better").click()
    models = (await (await voted.value).json())["models"]
    assert set(models.values()) == set(MODELS)
    for side in "ab":
        await expect(page.locator(f"#arena-{side} .model-name")).to_have_text(models[side])
    await expect(page.locator("#arena-status")).to_have_text(
        f"Vote recorded: {models['a']} (Model A) is better. Thank you! Start a new battle to vote again.")
    shown = await page_text(page)
    assert all(name in shown for name in MODELS)
    await expect(page.locator("#arena-a")).to_have_class("column arena-pane winner")
    for name in ("Send", "Regenerate", "A is better", "B is better", "Tie", "Both are bad"):
        await expect(page.get_by_role("button", name=name)).to_be_disabled()
    [(_, vote)] = await redis.xrange(keys.arena_votes())
    assert (vote["model_a"], vote["model_b"], vote["winner"]) == (models["a"], models["b"], "a")

    await screenshot(page, "ui-arena-voted")
    if os.environ.get("REDSERVE_SCREENSHOT") == "1":
        await page.screenshot(path=str(DOCS / "arena.png"))

    # The leaderboard: both models, one vote each, the winner first, plot and matrix drawn.
    await page.get_by_role("link", name="Leaderboard").click()
    rows = page.locator("#lb-table tbody tr")
    await expect(rows).to_have_count(2)
    await expect(page.locator("#lb-votes")).to_have_text("1 vote")
    await expect(rows.first).to_have_attribute("data-model", models["a"])
    for name in MODELS:
        row = page.locator(f'#lb-table tr[data-model="{name}"]')
        await expect(row.locator("td").nth(4)).to_have_text("1")  # votes (rank, rating, CI, Elo before it)
        await expect(row.locator("th")).to_have_text(name)
    await expect(rows.first.locator("td").nth(5)).to_have_text("100%")
    await expect(page.locator("#lb-plot circle.point")).to_have_count(2)
    await expect(page.locator("#lb-plot .name")).to_have_text(list(models.values()))
    await expect(page.locator("#lb-matrix td.cell")).to_have_count(2)
    await expect(page.locator('#lb-matrix td[data-fraction="1"]')).to_have_count(1)
    await screenshot(page, "ui-leaderboard")

    # A new battle starts from scratch: empty panes, no names, voting closed until a turn.
    await page.get_by_role("link", name="Arena").click()
    await page.get_by_role("button", name="New battle").click()
    await expect(page.locator("#arena-a .bubble")).to_have_count(0)
    await expect(page.locator("#arena-a .model-name")).to_have_text("")
    await expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    await expect(page.get_by_role("button", name="Tie")).to_be_disabled()


async def test_a_failing_side_ends_the_battle_without_naming_it(stack, page, redis, keys):  # noqa: F811
    gw = await arena_stack(stack)
    await page.goto(f"{gw.url}/#arena")
    await page.get_by_label("Prompt for the battle").fill("first turn works")
    await page.get_by_label("Prompt for the battle").press("Enter")
    await wait_replies(page, 1)

    beta, beta_task = stack.workers[1]
    beta.drain()
    await beta_task  # deregistered: beta's side of the next turn fails
    await page.get_by_label("Prompt for the battle").fill("second turn fails")
    await page.get_by_label("Prompt for the battle").press("Enter")
    await wait_replies(page, 2)
    failed = page.locator(".bubble.assistant.error")
    await expect(failed).to_have_count(1)
    await expect(failed.locator(".note")).to_contain_text("This reply failed:")
    await expect(failed.locator(".note")).to_contain_text("model_")
    await expect(page.locator("#arena-status")).to_contain_text("The battle ended without a vote: model_")
    for name in ("Send", "Regenerate", "A is better", "Tie"):
        await expect(page.get_by_role("button", name=name)).to_be_disabled()
    shown = await page_text(page)
    assert not any(name in shown for name in MODELS)
    assert await redis.xlen(keys.arena_votes()) == 0
    await screenshot(page, "ui-arena-failed")

    await page.get_by_role("link", name="Leaderboard").click()
    await expect(page.locator("#lb-status")).to_contain_text("No votes yet")
    await expect(page.locator("#lb-table tbody")).to_have_text("No votes yet")
    await expect(page.locator("#lb-figures")).to_be_hidden()


async def test_the_arena_needs_two_models(stack, page):  # noqa: F811
    await stack.worker(["solo"])
    gw = await stack.gateway()
    await page.goto(f"{gw.url}/#arena")
    await page.get_by_label("Prompt for the battle").fill("is anyone else here")
    await page.get_by_label("Prompt for the battle").press("Enter")
    await expect(page.locator("#arena-status")).to_contain_text("The arena needs at least two live models")
    await expect(page.locator(".bubble")).to_have_count(0)  # nothing was sent
    await expect(page.get_by_label("Prompt for the battle")).to_have_value("is anyone else here")
    await expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()


async def test_chat_feedback_is_stored_with_the_conversation(stack, page, redis, keys):  # noqa: F811
    await stack.worker(["echo"], echo_tokens=6)
    gw = await stack.gateway()
    await page.goto(gw.url)
    await expect(page.locator("#chat-model")).to_have_value("echo")
    prompt = "rate this reply please"
    await page.get_by_label("Message", exact=True).fill(prompt)
    await page.get_by_label("Message", exact=True).press("Enter")
    reply = page.locator(".msg.assistant").last
    await expect(reply).to_have_attribute("aria-busy", "false")
    text = "".join(echo_tokens(prompt, 6))
    await expect(reply.locator(".body")).to_have_text(text)

    down = reply.get_by_role("button", name="Downvote")
    await expect(reply.get_by_role("button", name="Upvote")).to_have_attribute("title", "Upvote")
    await expect(reply.get_by_role("button", name="Flag")).to_be_visible()
    await down.click()
    await expect(down).to_have_attribute("aria-pressed", "true")
    await expect(reply.get_by_role("button", name="Upvote")).to_be_disabled()  # up and down exclude each other

    [(_, entry)] = await redis.xrange(keys.feedback())
    assert (entry["model"], entry["rating"], entry["reply"]) == ("echo", "down", text)
    assert json.loads(entry["messages"]) == [{"role": "user", "content": prompt}]

    # A second turn: its feedback carries the whole conversation up to the message it answers.
    await page.get_by_label("Message", exact=True).fill("and again")
    await page.get_by_label("Message", exact=True).press("Enter")
    second = page.locator(".msg.assistant").nth(1)
    await expect(second).to_have_attribute("aria-busy", "false")
    await second.get_by_role("button", name="Flag").click()
    await expect(second.get_by_role("button", name="Flag")).to_have_attribute("aria-pressed", "true")
    entries = await redis.xrange(keys.feedback())
    assert [e["rating"] for _, e in entries] == ["down", "flag"]
    assert json.loads(entries[1][1]["messages"]) == [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": text},
        {"role": "user", "content": "and again"}]
    await screenshot(page, "ui-chat-feedback")
