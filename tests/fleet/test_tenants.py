"""Tenants end to end, on a live hub, a real node worker and a real engine: a key's models (a cold
model outside them never loads), expiry, request and token limits with OpenAI's headers (shared by
two hub processes), and usage equal to what clients were told."""
from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta

import httpx
import openai
import pytest
from django.utils import timezone

from fleet.models import Instance
from porten.keys import api_key_create
from porten.models import UsageRecord
from porten.usage import usage_persist
from tests.conftest import REPO_ROOT, hub_command, service_env, wait_for_http
from tests.fleet.conftest import BROKEN_REPO, offered
from tests.porten.test_metrics import scrape, value
from tests.services_plugin import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

HELLO = [{"role": "user", "content": "Say hello."}]


def _key(**scope) -> str:
    return api_key_create(name="tenant", **scope)[1]


def _chat(url: str, key: str, model: str, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": model, "messages": HELLO, "max_tokens": 4, **extra})


def test_a_key_sees_and_uses_only_its_models_and_a_forbidden_cold_model_never_loads(live_hub, node_worker, hf):
    offered("gemma-mine")
    offered("gemma-theirs")
    key = _key(allowed_models=["gemma-mine"])
    client = openai.OpenAI(base_url=live_hub.url + "/v1", api_key=key, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["gemma-mine"]
    with pytest.raises(openai.NotFoundError) as hidden:
        client.chat.completions.create(model="gemma-theirs", messages=HELLO, max_tokens=2)
    assert hidden.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gemma-theirs")
    assert not Instance.objects.filter(model__model_id="gemma-theirs").exists(), "it must not even start loading"
    assert client.chat.completions.create(model="gemma-mine", messages=HELLO, max_tokens=2).choices

    expired, raw = api_key_create(name="old", expires_at=timezone.now() + timedelta(seconds=1))
    time.sleep(1.2)
    response = _chat(live_hub.url, raw, "gemma-mine")
    assert response.status_code == 401 and "expired" in response.json()["error"]["message"]


@pytest.fixture
def second_hub(live_hub, tmp_path):
    """Another hub process on the same database and Redis: limits must hold across both."""
    port, log = free_port(), tmp_path / "hub2.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(hub_command("127.0.0.1", port), cwd=REPO_ROOT,
                                env=service_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path)), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout_s=30, proc=proc, log=log)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_request_and_token_limits_hold_across_two_hub_processes_with_openais_headers(
        live_hub, second_hub, node_worker, hf):
    offered("gemma-limited")
    warm_key = _key()
    assert _chat(live_hub.url, warm_key, "gemma-limited").status_code == 200  # loaded before the clock matters

    key = _key(rpm_limit=3)
    answers = [_chat(url, key, "gemma-limited") for url in (live_hub.url, second_hub, live_hub.url)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
    assert all(a.headers["x-ratelimit-limit-requests"] == "3" for a in answers)
    limited = _chat(second_hub, key, "gemma-limited")
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded" and limited.json()["error"]["type"] == "requests"
    assert 1 <= int(limited.headers["retry-after"]) <= 20
    assert limited.headers["x-ratelimit-remaining-requests"] == "0" and limited.headers["x-ratelimit-reset-requests"]
    client = openai.OpenAI(base_url=live_hub.url + "/v1", api_key=key, max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gemma-limited", messages=HELLO, max_tokens=2)

    tokens = _key(tpm_limit=300)
    small = _chat(second_hub, tokens, "gemma-limited")
    assert small.status_code == 200 and small.headers["x-ratelimit-limit-tokens"] == "300"
    left = int(small.headers["x-ratelimit-remaining-tokens"])
    assert 200 < left < 300
    big = _chat(live_hub.url, tokens, "gemma-limited", messages=[{"role": "user", "content": "word " * 400}])
    assert big.status_code == 429 and big.json()["error"]["type"] == "tokens"
    assert big.headers["x-ratelimit-remaining-tokens"]


def _stream(url: str, key: str, model: str, **extra) -> tuple[list[dict], bool]:
    chunks, done = [], False
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": HELLO, "max_tokens": 6, "stream": True, **extra},
                      timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    return chunks, done


def test_usage_recorded_is_what_clients_were_told(live_hub, node_worker, hf):
    offered("gemma-usage")
    key = _key()
    usage_persist()  # start from what earlier tests left
    UsageRecord.objects.all().delete()

    plain = _chat(live_hub.url, key, "gemma-usage").json()["usage"]
    asked, done = _stream(live_hub.url, key, "gemma-usage", stream_options={"include_usage": True})
    assert done and asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] >= 1
    streamed_usage = asked[-1]["usage"]
    not_asked, done = _stream(live_hub.url, key, "gemma-usage")
    assert done and all(chunk.get("usage") is None for chunk in not_asked), "no usage chunk it did not ask for"
    produced = sum(1 for c in not_asked for choice in c["choices"] if choice.get("delta", {}).get("content"))
    # A cold stream whose load fails reached no engine: it counts as a request that used nothing.
    offered("broken-usage", repo=BROKEN_REPO, hf_files=["*.gguf"])
    failed, done = _stream(live_hub.url, key, "broken-usage", stream_options={"include_usage": True})
    assert not done and failed[-1]["error"]["code"] == "model_load_failed"

    time.sleep(1.5)  # the hub writes its tallies to Redis within a second
    usage_persist()
    rows = list(UsageRecord.objects.filter(api_key__isnull=False, model_id="gemma-usage"))
    assert len(rows) == 1 and rows[0].requests == 3
    assert rows[0].completion_tokens == (plain["completion_tokens"] + streamed_usage["completion_tokens"]
                                         + produced)
    assert rows[0].prompt_tokens >= plain["prompt_tokens"] + streamed_usage["prompt_tokens"]
    broken = UsageRecord.objects.get(api_key__isnull=False, model_id="broken-usage")
    assert (broken.requests, broken.prompt_tokens, broken.completion_tokens) == (1, 0, 0)
    # The same figures in the hub's token counter (porten_tokens_total), added with each flush.
    found = scrape(live_hub.url)
    assert value(found, "porten_tokens_total", model="gemma-usage", kind="completion") == rows[0].completion_tokens
    assert value(found, "porten_tokens_total", model="gemma-usage", kind="prompt") == rows[0].prompt_tokens
