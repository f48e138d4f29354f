"""The web UI in a real browser: Debian's Chromium, headless, driven by Playwright against a live stack.

Each test loads the page from a real gateway and checks what a person would
see, then what Redis and the workers did. Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from support import in_background, kill, wait_for

from workers.echo import echo_tokens

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}

# The first test may have to apt-get install Chromium (see the fixture below).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when missing: a browser test must run, never skip."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail(f"{CHROMIUM} is missing and this user cannot apt-get install it: "
                        "run `apt-get install -y chromium` as root (make system-deps does)")
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr[-3000:]}")
        if not CHROMIUM.exists():
            pytest.fail(f"apt-get installed chromium but {CHROMIUM} is still missing")
    return str(CHROMIUM)


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page; any uncaught script error fails the test."""
    context = await browser.new_context(viewport=WIDE)
    opened = await context.new_page()
    opened.set_default_timeout(10_000)
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    await context.close()
    assert not errors, f"script errors on the page: {errors}"


async def screenshot(page: Page, name: str, viewport: dict[str, int] | None = None) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    if viewport:
        await page.set_viewport_size(viewport)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def chat_requests(page: Page) -> list[dict]:
    """The bodies (plus the Authorization header) of every chat request the page sends, as it sends them."""
    sent: list[dict] = []

    def record(req) -> None:  # noqa: ANN001
        if req.url.endswith("/v1/chat/completions"):
            sent.append({**req.post_data_json, "authorization": req.headers.get("authorization")})

    page.on("request", record)
    return sent


STREAMING_TEXT = """(sel) => {
  const node = document.querySelector(sel);
  const text = node && node.closest('[aria-busy="true"]') && node.textContent.trim();
  return text && text.split(/\\s+/).length >= 2 ? text : null;
}"""


async def text_while_streaming(page: Page, selector: str) -> str:
    """The text of `selector` at a moment its message is still streaming (two words or more)."""
    handle = await page.wait_for_function(STREAMING_TEXT, arg=selector)
    return await handle.json_value()


async def test_chat_streams_markdown_and_keeps_the_conversation(stack, page):
    await stack.worker(["echo"], echo_delay=0.05, echo_tokens=12)
    gw = await stack.gateway()
    sent = chat_requests(page)
    await page.goto(gw.url)
    await expect(page.locator("#chat-model")).to_have_value("echo")

    await page.get_by_text("API key:").click()
    await page.get_by_label("API key, sent as").fill("sk-test")
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator("#key-state")).to_have_text("set")
    await page.get_by_label("System prompt").fill("Be brief.")
    await page.get_by_label("Temperature").fill("0.5")
    await page.get_by_label("Max tokens").fill("10")

    first = "say **bold** and `code`"
    await page.get_by_label("Message", exact=True).fill(first)
    await page.get_by_label("Message", exact=True).press("Enter")
    partial = await text_while_streaming(page, ".msg.assistant .body")
    reply = page.locator(".msg.assistant").last
    await expect(reply).to_have_attribute("aria-busy", "false")
    final = (await reply.locator(".body").inner_text()).strip()
    assert len(partial) < len(final)  # seen while it was still arriving
    assert final == "say bold and code say bold and code say bold"  # Markdown rendered
    await expect(reply.locator("strong")).to_have_count(3)
    await expect(reply.locator("code")).to_have_count(2)
    await expect(reply.locator(".note")).to_have_text("Cut off at the max tokens limit.")

    await page.get_by_label("Message", exact=True).fill("second turn")
    await page.get_by_role("button", name="Send").click()
    await expect(page.locator(".msg.assistant").last).to_have_attribute("aria-busy", "false")
    await expect(page.locator(".msg.assistant").last.locator(".body")).to_have_text(
        "".join(echo_tokens("second turn", 10)))
    await screenshot(page, "ui-chat-wide")
    await page.emulate_media(color_scheme="dark")
    await screenshot(page, "ui-chat-dark")
    await page.emulate_media(color_scheme="light")

    first_reply = "".join(echo_tokens(first, 10))
    system = {"role": "system", "content": "Be brief."}
    assert sent[0]["messages"] == [system, {"role": "user", "content": first}]
    assert sent[1]["messages"] == [system, {"role": "user", "content": first},
                                   {"role": "assistant", "content": first_reply},
                                   {"role": "user", "content": "second turn"}]
    assert (sent[0]["temperature"], sent[0]["max_tokens"], sent[0]["stream"]) == (0.5, 10, True)
    assert "top_p" not in sent[0]  # empty field: the model's default
    assert {s["authorization"] for s in sent} == {"Bearer sk-test"}

    await page.get_by_role("button", name="Regenerate").click()
    await expect(page.locator(".msg.assistant").last).to_have_attribute("aria-busy", "false")
    assert sent[2]["messages"] == sent[1]["messages"]  # the last reply again, not a new turn
    await expect(page.locator(".msg")).to_have_count(4)

    await screenshot(page, "ui-chat-narrow", NARROW)
    await page.get_by_role("button", name="Clear").click()
    await expect(page.locator(".msg")).to_have_count(0)


async def test_stop_cancels_the_generation_on_the_worker(stack, page):
    worker = await stack.worker(["echo"], echo_delay=0.05, echo_tokens=500)
    gw = await stack.gateway()
    sent = chat_requests(page)
    await page.goto(gw.url)
    await expect(page.locator("#chat-model")).to_have_value("echo")

    await page.get_by_label("Message", exact=True).fill("stop me please")
    await page.get_by_label("Message", exact=True).press("Enter")
    await text_while_streaming(page, ".msg.assistant .body")
    assert worker.tasks, "the job should be running on the worker"
    await page.get_by_role("button", name="Stop").click()

    await wait_for(lambda: not worker.tasks, timeout=5)
    produced = worker.record.tokens_out
    await asyncio.sleep(0.5)
    assert worker.record.tokens_out == produced < 500  # generation stopped on the worker
    reply = page.locator(".msg.assistant").last
    await expect(reply.locator(".note")).to_have_text("Stopped.")
    stopped_text = (await reply.locator(".body").inner_text()).strip()
    assert stopped_text and stopped_text.split()[0] == "stop"

    # The chat goes on, and the partial reply is part of the history.
    await page.get_by_label("Max tokens").fill("3")
    await page.get_by_label("Message", exact=True).fill("again")
    await page.get_by_label("Message", exact=True).press("Enter")
    await expect(page.locator(".msg.assistant").last.locator(".body")).to_have_text("again again again")
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"].startswith("stop me please")


async def test_side_by_side_streams_both_models_and_records_the_vote(stack, page, redis, keys):
    await stack.worker(["alpha"], echo_delay=0.05, echo_tokens=10)
    await stack.worker(["beta"], echo_delay=0.05, echo_tokens=10)
    gw = await stack.gateway()
    await page.goto(f"{gw.url}/#compare")
    await expect(page.locator("#left-model")).to_have_value("alpha")
    await expect(page.locator("#right-model")).to_have_value("beta")
    await page.get_by_label("Temperature").fill("0.3")

    prompt = "which reply is better"
    await page.get_by_label("Prompt for both models").fill(prompt)
    await page.get_by_role("button", name="Send to both").click()
    # Both columns stream at the same time: each has text while both are still busy.
    await page.wait_for_function("""() => ['left', 'right'].every((side) => {
        const column = document.getElementById(side + '-column');
        return column.getAttribute('aria-busy') === 'true' && column.querySelector('.reply').textContent.trim();
    })""")
    for side in ("left", "right"):
        await expect(page.locator(f"#{side}-column")).to_have_attribute("aria-busy", "false")
        await expect(page.locator(f"#{side}-out")).to_have_text("".join(echo_tokens(prompt, 10)))
    await expect(page.locator("#left-title")).to_have_text("alpha")
    await screenshot(page, "ui-compare-wide")

    await page.get_by_role("button", name="Left is better").click()
    await expect(page.locator("#compare-status")).to_have_text("Vote recorded: alpha (left) is better. Thank you!")
    await expect(page.get_by_role("button", name="Right is better")).to_be_disabled()

    votes = await redis.xrange(keys.votes())
    assert len(votes) == 1
    vote = votes[0][1]
    reply = "".join(echo_tokens(prompt, 10))
    assert vote == {"winner": "left", "left_model": "alpha", "right_model": "beta", "prompt": prompt, "system": "",
                    "left_reply": reply, "right_reply": reply, "params": json.dumps({"temperature": 0.3}),
                    "tenant": "anonymous"}
    await screenshot(page, "ui-compare-narrow", NARROW)


async def test_fleet_dashboard_is_live_and_drops_a_killed_worker(stack, page, redis, keys, settings):
    await stack.worker(["busy"], worker_id="steady", echo_delay=0.02, echo_tokens=400)
    doomed = stack.spawn_worker("doomed", ["echo"])
    await wait_for(lambda: redis.exists(keys.worker("doomed")))
    gw = await stack.gateway()
    load = gw.client().chat.completions.create(model="busy", messages=[{"role": "user", "content": "keep busy"}])
    async with in_background(load):
        await page.goto(f"{gw.url}/#fleet")
        doomed_row = page.locator('tr[data-worker-id="doomed"]')
        steady_row = page.locator('tr[data-worker-id="steady"]')
        await expect(doomed_row).to_be_visible()
        await expect(steady_row.locator("td").nth(0)).to_have_text("busy")
        await expect(steady_row.locator("td").nth(3)).to_have_text("1 / 8")  # one job queued (running)
        # tokens/s from the change of tokens_out between heartbeats: about 50 at 0.02 s a token
        await page.wait_for_function("""() => {
            const cell = document.querySelectorAll('tr[data-worker-id="steady"] td')[4];
            return cell && parseFloat(cell.textContent) > 10;
        }""")
        await expect(page.locator("#chart-tps polyline")).not_to_have_count(0)
        await screenshot(page, "ui-fleet-wide")

        kill(doomed)
        killed = time.monotonic()
        await expect(doomed_row).to_have_count(0, timeout=(settings.worker_ttl + 5) * 1000)
        assert time.monotonic() - killed <= settings.worker_ttl + 2.5  # TTL + one poll + slack
        await expect(steady_row).to_be_visible()
        await screenshot(page, "ui-fleet-narrow", NARROW)


async def test_errors_are_shown_as_readable_messages(stack, page, redis, keys):
    await stack.worker(["ghost"], worker_id="ghost")
    await stack.worker(["busy"], worker_id="busy", max_queue=1, echo_delay=0.1, echo_tokens=100)
    gw = await stack.gateway()
    load = gw.client().chat.completions.create(model="busy", messages=[{"role": "user", "content": "hog the slot"}])
    async with in_background(load):
        await page.goto(gw.url)
        await expect(page.locator("#chat-model option")).to_have_count(2)
        ghost, ghost_task = stack.workers[0]
        ghost.drain()
        await ghost_task  # deregistered: the model is known, but no worker is alive (503)

        await page.locator("#chat-model").select_option("ghost")
        await page.get_by_label("Message", exact=True).fill("anyone there?")
        await page.get_by_label("Message", exact=True).press("Enter")
        error = page.locator(".msg.error").last.locator(".note")
        await expect(error).to_contain_text("No worker is serving this model right now")
        await expect(error).to_contain_text("503")
        await expect(error).to_have_attribute("role", "alert")
        await expect(page.locator("#chat-model option:checked")).to_have_text("ghost (gone)")

        await wait_for(lambda: redis.hget(keys.worker("busy"), "queue"), timeout=5)
        await page.locator("#chat-model").select_option("busy")
        await page.get_by_label("Message", exact=True).fill("me too")
        await page.get_by_label("Message", exact=True).press("Enter")
        await expect(page.locator(".msg.error").last.locator(".note")).to_contain_text(
            "Too busy right now: try again in 1 s. (429")
        await expect(page.get_by_role("button", name="Send")).to_be_enabled()
        await screenshot(page, "ui-errors")


MARKDOWN_CASES = {
    "<script>alert(1)</script> <img src=x onerror=alert(1)>":
        "<p>&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x onerror=alert(1)&gt;</p>",
    "[bad](javascript:alert(1)) [also](JaVaScRiPt:alert(1))":
        "<p>[bad](javascript:alert(1)) [also](JaVaScRiPt:alert(1))</p>",
    '[x](https://e.com/"onmouseover="alert(1))':
        '<p><a href="https://e.com/&quot;onmouseover=&quot;alert(1" target="_blank" '
        'rel="noopener noreferrer">x</a>)</p>',
    "[docs](https://example.com/a_b_c) and https://example.com/x_y_z.":
        '<p><a href="https://example.com/a_b_c" target="_blank" rel="noopener noreferrer">docs</a> and '
        '<a href="https://example.com/x_y_z" target="_blank" rel="noopener noreferrer">https://example.com/x_y_z</a>.</p>',
    "**bold** and *it* and _it_ and `co*de*` and snake_case_name and 2 * 3 * 4":
        "<p><strong>bold</strong> and <em>it</em> and <em>it</em> and <code>co*de*</code> and snake_case_name "
        "and 2 * 3 * 4</p>",
    "```python\nif a < b:\n    print('**x**')\n```\nafter":
        '<pre><code class="language-python">if a &lt; b:\n    print(&#39;**x**&#39;)</code></pre>\n<p>after</p>',
    "```\nstill streaming <b>":
        "<pre><code>still streaming &lt;b&gt;</code></pre>",
    "Steps:\n- one\n- two\n  - nested *deep*\n\n3. third\n4. fourth":
        "<p>Steps:</p>\n<ul><li>one</li><li>two<ul><li>nested <em>deep</em></li></ul></li></ul>\n"
        '<ol start="3"><li>third</li><li>fourth</li></ol>',
    "# Title\npara one\nline two\n\n> quoted **text**\n\n---":
        "<h1>Title</h1>\n<p>para one<br>line two</p>\n"
        "<blockquote><p>quoted <strong>text</strong></p></blockquote>\n<hr>",
}


async def test_console_endpoints_report_the_fleet_and_check_votes(stack, redis, keys):
    await stack.worker(["echo"], worker_id="w1")
    gw = await stack.gateway()
    async with httpx.AsyncClient(base_url=gw.url) as http:
        fleet = (await http.get("/api/fleet")).json()
        assert abs(fleet["now"] - time.time()) < 5
        assert [(w["id"], w["models"], w["status"]) for w in fleet["workers"]] == [("w1", ["echo"], "ready")]
        assert {"queue", "tokens_out", "jobs_done", "last_heartbeat", "engine"} <= fleet["workers"][0].keys()

        vote = {"winner": "tie", "left_model": "a", "right_model": "b", "prompt": "p", "params": {"max_tokens": 10}}
        created = await http.post("/api/votes", json=vote)
        assert created.status_code == 201
        [(entry_id, fields)] = await redis.xrange(keys.votes())
        assert created.json() == {"id": entry_id}
        assert (fields["winner"], fields["params"], fields["left_reply"]) == ("tie", '{"max_tokens": 10}', "")

        refused = await http.post("/api/votes", json={**vote, "winner": "left-ish"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "winner"
        extra = await http.post("/api/votes", json={**vote, "comment": "x"})
        assert extra.status_code == 400 and "comment" in extra.json()["error"]["message"]
        assert await redis.xlen(keys.votes()) == 1


async def test_markdown_renderer_is_safe_and_covers_the_basics(stack, page):
    gw = await stack.gateway()
    await page.set_viewport_size(NARROW)
    await page.goto(gw.url)
    await expect(page.get_by_role("status").last).to_contain_text("No live model")
    assert not await page.locator("#params-panel").get_attribute("open")  # folded on a narrow window
    await screenshot(page, "ui-narrow-empty")
    rendered = await page.evaluate("""async (cases) => {
        const { renderMarkdown } = await import('/markdown.js');
        return cases.map((source) => {
            const html = renderMarkdown(source);
            const box = document.createElement('div');
            box.innerHTML = html;
            const unsafe = box.querySelectorAll('script, img, iframe, [onerror], [onmouseover], [style]').length;
            const hrefs = [...box.querySelectorAll('a')].map((a) => a.getAttribute('href'));
            return { html, unsafe, hrefs };
        });
    }""", list(MARKDOWN_CASES))
    for (source, expected), got in zip(MARKDOWN_CASES.items(), rendered):
        assert got["html"] == expected, source
        assert got["unsafe"] == 0, source
        assert all(h.startswith("https://") for h in got["hrefs"]), source
