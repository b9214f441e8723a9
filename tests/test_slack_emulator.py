"""Tests of the Slack Web API emulator, driven through the real slack_sdk AsyncWebClient."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from slack_emulator import RateLimits, SlackEmulator


def section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def button(text: str, value: str = "v", action_id: str = "approve") -> dict:
    return {
        "type": "button",
        "text": {"type": "plain_text", "text": text},
        "value": value,
        "action_id": action_id,
    }


@pytest.fixture
async def slack():
    async with SlackEmulator(usergroups={"S0ONCALL": ["U1", "U2"]}) as emulator:
        yield emulator


@pytest.fixture
def client(slack: SlackEmulator) -> AsyncWebClient:
    return AsyncWebClient(token="xoxb-test", base_url=slack.base_url)


async def expect_error(call, error: str, status: int = 200) -> SlackApiError:
    with pytest.raises(SlackApiError) as raised:
        await call
    assert raised.value.response["error"] == error
    assert raised.value.response.status_code == status
    return raised.value


async def test_base_url_is_local(slack: SlackEmulator):
    assert slack.base_url.startswith("http://127.0.0.1:")
    assert slack.base_url.endswith("/api/")


async def test_auth_test_returns_identity(slack: SlackEmulator, client: AsyncWebClient):
    response = await client.auth_test()

    assert response["ok"] is True
    assert response["team"] == slack.team
    assert response["user_id"] == slack.user_id
    assert response["bot_id"] == slack.bot_id


async def test_post_update_replies_round_trip(slack: SlackEmulator, client: AsyncWebClient):
    posted = await client.chat_postMessage(channel="C1", text="deploy started", blocks=[section("started")])
    ts = posted["ts"]
    assert posted["channel"] == "C1"
    assert posted["message"]["text"] == "deploy started"

    reply = await client.chat_postMessage(channel="C1", text="step 1 done", thread_ts=ts)
    assert float(reply["ts"]) > float(ts)

    updated = await client.chat_update(channel="C1", ts=ts, text="deploy finished", blocks=[section("finished")])
    assert updated["ts"] == ts
    assert updated["message"]["text"] == "deploy finished"

    replies = await client.conversations_replies(channel="C1", ts=ts)
    texts = [message["text"] for message in replies["messages"]]
    assert texts == ["deploy finished", "step 1 done"]
    assert replies["messages"][0]["blocks"] == [section("finished")]
    assert replies["messages"][1]["thread_ts"] == ts

    assert slack.messages[("C1", ts)]["text"] == "deploy finished"
    assert slack.thread("C1", ts) == replies["messages"]
    assert slack.count("chat.postMessage") == 2
    assert slack.calls_to("chat.update")[0].args["text"] == "deploy finished"


async def test_ts_unique_and_increasing(client: AsyncWebClient):
    timestamps = []
    for channel in ("C1", "C2", "C3", "C4"):
        response = await client.chat_postMessage(channel=channel, text="hi")
        timestamps.append(response["ts"])

    assert len(set(timestamps)) == len(timestamps)
    assert timestamps == sorted(timestamps, key=float)
    seconds, micros = timestamps[0].split(".")
    assert len(seconds) == 10
    assert len(micros) == 6


async def test_update_unknown_ts(client: AsyncWebClient):
    await expect_error(client.chat_update(channel="C1", ts="1.000001", text="x"), "message_not_found")


async def test_post_ephemeral_returns_message_ts(slack: SlackEmulator, client: AsyncWebClient):
    response = await client.chat_postEphemeral(channel="C1", user="U1", text="only you")

    assert response["message_ts"]
    assert slack.ephemerals[0]["user"] == "U1"
    assert slack.messages == {}


async def test_usergroup_users(client: AsyncWebClient):
    response = await client.usergroups_users_list(usergroup="S0ONCALL")
    assert response["users"] == ["U1", "U2"]

    await expect_error(client.usergroups_users_list(usergroup="S0NONE"), "no_such_subteam")


@pytest.mark.parametrize(
    ("blocks", "text", "error"),
    [
        ([section("x")] * 51, "fallback", "invalid_blocks"),
        ([section("a" * 3001)], "fallback", "invalid_blocks"),
        ([{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}], "fallback", "invalid_blocks"),
        ([{"type": "actions", "elements": [button("b" * 76)]}], "fallback", "invalid_blocks"),
        ([{"type": "actions", "elements": [button("ok", value="v" * 2001)]}], "fallback", "invalid_blocks"),
        ([{"type": "actions", "elements": [button("ok", action_id="a" * 256)]}], "fallback", "invalid_blocks"),
        ([{"type": "divider", "block_id": "b" * 256}], "fallback", "invalid_blocks"),
        ([{"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 11}], "fallback", "invalid_blocks"),
        ([{"text": {"type": "mrkdwn", "text": "no type"}}], "fallback", "invalid_blocks"),
        ([{"type": "carousel"}], "fallback", "invalid_blocks"),
        (None, "t" * 4001, "msg_too_long"),
        ([section("a" * 2400)] * 5 + [section("a")], "fallback", "msg_blocks_too_long"),
    ],
    ids=[
        "51-blocks",
        "section-3001",
        "header-151",
        "button-text-76",
        "button-value-2001",
        "action-id-256",
        "block-id-256",
        "context-11-elements",
        "missing-type",
        "unknown-type",
        "text-4001",
        "blocks-total-12001",
    ],
)
async def test_limit_error_names(client: AsyncWebClient, blocks, text, error):
    await expect_error(client.chat_postMessage(channel="C1", text=text, blocks=blocks), error)


async def test_limits_apply_to_update_and_ephemeral(client: AsyncWebClient):
    # Two messages, because a rejected update still counts against the limit of
    # one update per second per message.
    first = await client.chat_postMessage(channel="C1", text="ok")
    second = await client.chat_postMessage(channel="C1", text="ok")
    too_long = [section("a" * 3001)]

    await expect_error(client.chat_update(channel="C1", ts=first["ts"], text="x", blocks=too_long), "invalid_blocks")
    await expect_error(
        client.chat_postEphemeral(channel="C1", user="U1", text="x", blocks=too_long),
        "invalid_blocks",
    )
    await expect_error(client.chat_update(channel="C1", ts=second["ts"], text="t" * 4001), "msg_too_long")


async def test_limits_at_maximum_pass(client: AsyncWebClient):
    # 2,000 code points of CJK and 1,000 emoji outside the BMP, which are 4,000
    # UTF-16 units and 10,000 UTF-8 bytes, so only a code-point count accepts it.
    text = "日本語" * 500 + "本" * 500 + "🚀" * 1000
    assert len(text) == 3000
    blocks = [section(text), {"type": "actions", "elements": [button("b" * 75)]}]

    posted = await client.chat_postMessage(channel="C1", text="t" * 4000, blocks=blocks)
    assert posted["message"]["blocks"][0]["text"]["text"] == text

    fifty = await client.chat_postMessage(channel="C2", text="fallback", blocks=[section("x")] * 50)
    assert len(fifty["message"]["blocks"]) == 50

    total_12000 = [section("a" * 2400)] * 5
    await client.chat_postMessage(channel="C3", text="fallback", blocks=total_12000)


async def test_invalid_blocks_lists_problem(client: AsyncWebClient):
    error = await expect_error(client.chat_postMessage(channel="C1", text="x", blocks=[section("a" * 3001)]), "invalid_blocks")
    assert "json-pointer:/blocks/0/text/text" in error.response["errors"][0]


async def test_update_window_429_then_retry():
    limits = RateLimits(update_per_channel=50, update_window=1.0, update_per_message_interval=0.0)
    async with SlackEmulator(rate_limits=limits) as slack:
        plain = AsyncWebClient(token="xoxb-test", base_url=slack.base_url)
        posted = await plain.chat_postMessage(channel="C1", text="v0")
        for version in range(50):
            await plain.chat_update(channel="C1", ts=posted["ts"], text=f"v{version + 1}")

        error = await expect_error(plain.chat_update(channel="C1", ts=posted["ts"], text="v51"), "ratelimited", 429)
        assert error.response.headers["Retry-After"] == "1"
        assert slack.messages[("C1", posted["ts"])]["text"] == "v50"

        retrying = AsyncWebClient(
            token="xoxb-test",
            base_url=slack.base_url,
            retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)],
        )
        started = time.monotonic()
        await retrying.chat_update(channel="C1", ts=posted["ts"], text="v51")
        waited = time.monotonic() - started

    assert waited >= 1.0
    statuses = [call.status for call in slack.calls_to("chat.update")]
    assert statuses[-3:] == [429, 429, 200]
    assert slack.messages[("C1", posted["ts"])]["text"] == "v51"


async def test_update_same_message_too_fast(slack: SlackEmulator, client: AsyncWebClient):
    posted = await client.chat_postMessage(channel="C1", text="v0")
    other = await client.chat_postMessage(channel="C1", text="w0")
    await client.chat_update(channel="C1", ts=posted["ts"], text="v1")

    error = await expect_error(client.chat_update(channel="C1", ts=posted["ts"], text="v2"), "ratelimited", 429)
    assert error.response.headers["Retry-After"] == "1"
    await client.chat_update(channel="C1", ts=other["ts"], text="w1")


async def test_post_message_burst_then_429():
    limits = RateLimits(post_interval=0.2, post_burst=3)
    async with SlackEmulator(rate_limits=limits) as slack:
        plain = AsyncWebClient(token="xoxb-test", base_url=slack.base_url)
        for number in range(3):
            await plain.chat_postMessage(channel="C1", text=f"burst {number}")

        error = await expect_error(plain.chat_postMessage(channel="C1", text="over"), "ratelimited", 429)
        assert error.response.headers["Retry-After"] == "1"
        await plain.chat_postMessage(channel="C2", text="other channel")

        await asyncio.sleep(0.25)
        await plain.chat_postMessage(channel="C1", text="after refill")

    assert [call.status for call in slack.calls_to("chat.postMessage")] == [200, 200, 200, 429, 200, 200]


async def test_missing_token_not_authed(slack: SlackEmulator):
    anonymous = AsyncWebClient(base_url=slack.base_url)
    await expect_error(anonymous.auth_test(), "not_authed")

    user_token = AsyncWebClient(token="xoxp-user", base_url=slack.base_url)
    await expect_error(user_token.chat_postMessage(channel="C1", text="hi"), "not_authed")
    assert slack.messages == {}


async def test_wrong_token_invalid_auth(slack: SlackEmulator):
    wrong = AsyncWebClient(token="xoxb-invalid", base_url=slack.base_url)
    await expect_error(wrong.chat_postMessage(channel="C1", text="hi"), "invalid_auth")
    assert slack.calls[-1].error == "invalid_auth"


async def test_unknown_method_404(slack: SlackEmulator, client: AsyncWebClient):
    error = await expect_error(client.api_call("chat.fly"), "unknown_method", 404)
    assert error.response["req_method"] == "chat.fly"
    assert slack.calls[-1].method == "chat.fly"


async def test_form_encoded_blocks_parsed(slack: SlackEmulator):
    # api_call with `data` sends a form body, where Slack accepts blocks as a JSON string.
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            slack.base_url + "chat.postMessage",
            data={"channel": "C1", "blocks": '[{"type": "divider"}]', "text": "form"},
            headers={"Authorization": "Bearer xoxb-test"},
        )
        body = await response.json()

    assert body["ok"] is True
    assert slack.messages[("C1", body["ts"])]["blocks"] == [{"type": "divider"}]


async def test_outage_then_recovery(slack: SlackEmulator, client: AsyncWebClient):
    slack.outage(True)
    await expect_error(client.chat_postMessage(channel="C1", text="hi"), "service_unavailable", 503)
    await expect_error(client.auth_test(), "service_unavailable", 503)

    slack.outage(False)
    response = await client.chat_postMessage(channel="C1", text="hi")
    assert response["ok"] is True
    assert [call.status for call in slack.calls] == [503, 503, 200]


async def test_fail_next_once(slack: SlackEmulator, client: AsyncWebClient):
    slack.fail_next("chat.postMessage")
    slack.fail_next("chat.postMessage", error="fatal_error", status=200)

    await expect_error(client.chat_postMessage(channel="C1", text="a"), "internal_error", 500)
    await expect_error(client.chat_postMessage(channel="C1", text="b"), "fatal_error")
    await client.auth_test()
    response = await client.chat_postMessage(channel="C1", text="c")

    assert response["ok"] is True
    assert [call.error for call in slack.calls_to("chat.postMessage")] == ["internal_error", "fatal_error", None]
