"""The HTTP gateway admits through the router's own auth (the gRPC interceptor does not
see in-process calls): a real router with --auth-file and --http-port over a null worker,
driven with the official openai client and plain HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.procs import free_port, start_router, start_worker
from tests.security_fixtures import NULL_WORKER
from tests.test_security_auth import TOKENS, auth_file_text


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    auth = tmp_path_factory.mktemp("auth") / "auth.toml"
    auth.write_text(auth_file_text())
    worker = start_worker(*NULL_WORKER)
    http_port = free_port()
    router = None
    try:
        worker.wait_healthy(timeout_s=300)
        router = start_router(
            [worker.address], "--auth-file", str(auth), "--http-port", str(http_port)
        )
        router.wait_healthy(timeout_s=120)
        yield f"http://127.0.0.1:{http_port}"
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def client(url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)


def chat(c: openai.OpenAI, model: str) -> str:
    reply = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    return reply.choices[0].message.content or ""


def test_no_or_wrong_token_is_401_right_token_streams(gateway):
    request = urllib.request.Request(
        f"{gateway}/v1/chat/completions",
        data=json.dumps({"model": "", "messages": [{"role": "user", "content": "x"}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 401
    assert json.loads(err.value.read())["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        chat(client(gateway, "not-a-key"), "any")
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "not-a-key").models.list()
    c = client(gateway, TOKENS["team-a"])
    chunks = list(
        c.chat.completions.create(
            model=c.models.list().data[0].id,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
        )
    )
    assert any(ch.choices and ch.choices[0].delta.content for ch in chunks)
    # The page and the gateway's health stay open: they carry no data.
    with urllib.request.urlopen(f"{gateway}/", timeout=30) as page:
        assert page.status == 200


def test_quota_is_429_with_retry_after_and_fine_tuning_needs_the_right(gateway):
    model = client(gateway, TOKENS["team-a"]).models.list().data[0].id
    limited = client(gateway, TOKENS["limited"])  # requests_per_minute = 2
    chat(limited, model)
    chat(limited, model)
    with pytest.raises(openai.RateLimitError) as err:
        chat(limited, model)
    assert "requests_per_minute" in str(err.value)
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert chat(client(gateway, TOKENS["team-b"]), model)  # another tenant is still served
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, TOKENS["team-a"]).fine_tuning.jobs.list()
    assert client(gateway, TOKENS["trainer"]).fine_tuning.jobs.list().data == []
