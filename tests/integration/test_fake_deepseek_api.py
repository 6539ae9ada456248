"""The fake DeepSeek's errors, validation, auth and other endpoints (see test_fake_deepseek.py)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support.fake_clients import UPSTREAM_AUTH, chat
from tests.support.fake_deepseek import FakeDeepSeek
from tests.support.fake_deepseek_shapes import (
    BALANCE,
    FAKE_UPSTREAM_KEY,
    MODELS,
    Reply,
    error_body,
)

# --- errors, validation, auth ----------------------------------------------------------------

ERRORS = [
    (400, "Invalid Format", openai.BadRequestError),
    (401, "Authentication Fails, Your api key: ****NARY is invalid", openai.AuthenticationError),
    (402, "Insufficient Balance", openai.APIStatusError),
    (422, "Invalid Parameters", openai.UnprocessableEntityError),
    (429, "Rate Limit Reached", openai.RateLimitError),
    (500, "Server Error", openai.InternalServerError),
    (503, "Server Overloaded", openai.InternalServerError),
]


@pytest.mark.parametrize(
    ("status", "message", "exception"), ERRORS, ids=[str(status) for status, _, _ in ERRORS]
)
async def test_error_replies(
    fake: FakeDeepSeek,
    client: httpx.AsyncClient,
    sdk: openai.AsyncOpenAI,
    status: int,
    message: str,
    exception: type[openai.APIStatusError],
) -> None:
    fake.enqueue(Reply(status=status), Reply(status=status))
    response = await client.post("/chat/completions", json=chat(stream=True))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert "x-ds-trace-id" in response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["message"], error["param"]) == (message, None)

    with pytest.raises(exception) as raised:
        await sdk.chat.completions.create(model="deepseek-flash", messages=[])
    assert raised.value.status_code == status


async def test_custom_error_body_and_headers(fake: FakeDeepSeek, client: httpx.AsyncClient) -> None:
    body = b'{"error":{"message":"Your current concurrency is 40, which exceeds 39"}}'
    fake.enqueue(Reply(status=429, error_body=body, headers={"x-should-retry": "false"}))
    response = await client.post("/chat/completions", json=chat())
    assert (response.status_code, response.content) == (429, body)
    assert response.headers["x-should-retry"] == "false"


async def test_wrong_or_missing_key_is_401_echoing_its_last_4_characters(
    fake: FakeDeepSeek,
) -> None:
    fake.enqueue(Reply(content=["kept"]))
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key="sk-wrong-ABCD", max_retries=0
    ) as api:
        with pytest.raises(openai.AuthenticationError) as raised:
            await api.chat.completions.create(model="deepseek-flash", messages=[])
    assert raised.value.body == {
        "message": "Authentication Fails, Your api key: ****ABCD is invalid",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_request_error",
    }
    async with httpx.AsyncClient(base_url=fake.base_url) as anonymous:
        for path in ("/models", "/user/balance", "/beta/completions"):
            response = await anonymous.request("POST" if "beta" in path else "GET", path)
            assert response.status_code == 401, path
            assert response.json()["error"]["message"] == (
                "Authentication Fails, Your api key: **** is invalid"
            )
    assert [request.headers.get("Authorization") for request in fake.requests] == [
        "Bearer sk-wrong-ABCD",
        None,
        None,
        None,
    ]
    async with httpx.AsyncClient(base_url=fake.base_url, headers=UPSTREAM_AUTH) as http:
        response = await http.post("/chat/completions", json=chat())
    assert response.json()["choices"][0]["message"]["content"] == "kept"


INVALID: list[tuple[str, str, bytes, int, str]] = [
    ("bad-json", "/chat/completions", b"{not json", 400, "Invalid Format"),
    ("not-an-object", "/chat/completions", b"[1]", 400, "Invalid Format"),
    ("no-model", "/chat/completions", b'{"messages": []}', 422, "Invalid Parameters"),
    ("no-messages", "/chat/completions", b'{"model": "deepseek-flash"}', 422, "Invalid Parameters"),
    (
        "fim-no-prompt",
        "/beta/completions",
        b'{"model": "deepseek-flash"}',
        422,
        "Invalid Parameters",
    ),
    (
        "stream-options-without-stream",
        "/chat/completions",
        b'{"model": "m", "messages": [], "stream_options": {"include_usage": true}}',
        400,
        "Invalid Format",
    ),
    (
        "stream-options-with-stream-false",
        "/chat/completions",
        b'{"model": "m", "messages": [], "stream": false, "stream_options": {}}',
        400,
        "Invalid Format",
    ),
    (
        "nonexistent-model",
        "/chat/completions",
        b'{"model": "nonexistent-model", "messages": []}',
        400,
        "Model Not Exist",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
async def test_validation_rejects_without_consuming_the_queue(
    fake: FakeDeepSeek, client: httpx.AsyncClient, path: str, body: bytes, status: int, message: str
) -> None:
    fake.enqueue(Reply(content=["queued"]))
    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert response.json()["error"]["message"].startswith(message)
    assert fake.requests[-1].body == body

    response = await client.post("/chat/completions", json=chat())
    assert response.json()["choices"][0]["message"]["content"] == "queued"


async def test_any_other_model_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat(model="made-up-model"))
    assert response.json()["model"] == "made-up-model"


async def test_unknown_path_and_wrong_method_are_404(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    for method, path in (("POST", "/v2/chat/completions"), ("GET", "/chat/completions")):
        response = await client.request(method, path)
        assert response.status_code == 404
        assert "message" in response.json()["error"]
    assert [(request.method, request.path) for request in fake.requests] == [
        ("POST", "/v2/chat/completions"),
        ("GET", "/chat/completions"),
    ]


def test_error_body_for_an_unlisted_status() -> None:
    assert json.loads(error_body(504))["error"]["message"] == "Gateway Timeout"


# --- other endpoints, redirects, bookkeeping --------------------------------------------------


async def test_models_on_both_paths(
    fake: FakeDeepSeek, client: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    for path in ("/models", "/v1/models"):
        response = await client.get(path)
        assert response.json() == MODELS
    assert [model.id async for model in sdk.models.list()] == ["deepseek-flash", "deepseek-v4-pro"]


async def test_balance(client: httpx.AsyncClient) -> None:
    response = await client.get("/user/balance")
    assert response.status_code == 200
    assert response.json() == BALANCE
    assert response.json()["balance_infos"][0]["total_balance"] == "110.00"


async def test_redirect_reply(fake: FakeDeepSeek, client: httpx.AsyncClient) -> None:
    fake.enqueue(Reply(redirect_to="http://127.0.0.1:9/elsewhere"))
    response = await client.post("/chat/completions", json=chat())
    assert response.status_code == 307
    assert response.headers["location"] == "http://127.0.0.1:9/elsewhere"
    response = await client.post("/chat/completions", json=chat())
    assert response.status_code == 200  # the redirect was used up


async def test_replies_are_used_in_order_then_default(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Reply(content=["one"]), Reply(content=["two"], headers={"x-extra": "yes"}))
    answers = []
    for _ in range(3):
        response = await client.post("/chat/completions", json=chat())
        answers.append(
            (response.json()["choices"][0]["message"]["content"], response.headers.get("x-extra"))
        )
    assert answers == [("one", None), ("two", "yes"), ("Hello world", None)]


async def test_requests_are_recorded_as_received(
    fake: FakeDeepSeek, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        "/chat/completions", json=chat(user_id="team-a"), headers={"X-Custom": "1"}
    )
    recorded = fake.requests[-1]
    assert (recorded.method, recorded.path) == ("POST", "/chat/completions")
    assert recorded.headers["Authorization"] == f"Bearer {FAKE_UPSTREAM_KEY}"
    assert recorded.headers["X-Custom"] == "1"
    assert recorded.json == chat(user_id="team-a")
    assert json.loads(recorded.body) == recorded.json
    assert recorded.id == response.json()["id"]
    await fake.wait_for(lambda: fake.finished == [recorded.id])


async def test_connections_are_counted(fake: FakeDeepSeek, client: httpx.AsyncClient) -> None:
    await client.get("/models")
    await client.get("/models")
    assert fake.connections_seen == 1  # the pooled connection was reused
    async with httpx.AsyncClient(base_url=fake.base_url, headers=UPSTREAM_AUTH) as other:
        await other.get("/models")
    assert fake.connections_seen == 2


async def test_wait_for_times_out(fake: FakeDeepSeek) -> None:
    with pytest.raises(TimeoutError):
        await fake.wait_for(lambda: False, timeout=0.02)


async def test_base_url_needs_start() -> None:
    with pytest.raises(RuntimeError):
        _ = FakeDeepSeek().base_url
