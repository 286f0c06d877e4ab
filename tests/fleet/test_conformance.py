"""What the current OpenAI API sends, against the real default engine through Porten: adapted when
the engine understands it another way, refused with a 400 naming the field when it cannot do it,
and an engine's own errors passed on in the OpenAI shape without its internals."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.fleet.conftest import offered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

HELLO = [{"role": "user", "content": "Hello"}]


def test_requests_as_the_current_api_sends_them_are_answered_and_unsupported_features_refused(
        live_hub, api_key, node_worker, hf):
    offered("gemma-conform")
    client = openai.OpenAI(base_url=live_hub.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
    developer = client.chat.completions.create(
        model="gemma-conform", max_completion_tokens=6,
        messages=[{"role": "developer", "content": "Be brief."}, *HELLO])
    assert developer.choices[0].message.content is not None
    assert developer.usage.completion_tokens <= 6, "max_completion_tokens is honoured"
    raw = httpx.post(live_hub.url + "/v1/completions", headers={"Authorization": f"Bearer {api_key}"}, timeout=120,
                     json={"model": "gemma-conform", "prompt": "Once", "max_tokens": 4, "echo": None,
                           "logit_bias": None, "suffix": None, "user": None})
    assert raw.status_code == 200, raw.text
    for extra, param in (({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
                          "response_format.type")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="gemma-conform", messages=HELLO, max_tokens=4, **extra)
        assert refused.value.status_code == 400
        assert refused.value.body["param"] == param


def test_an_engine_error_reaches_the_client_in_the_openai_shape_without_internals(live_hub, api_key, node_worker, hf):
    offered("gemma-engine-error")
    headers = {"Authorization": f"Bearer {api_key}"}
    url = live_hub.url + "/v1/chat/completions"
    assert httpx.post(url, headers=headers, json={"model": "gemma-engine-error", "messages": HELLO, "max_tokens": 2},
                      timeout=120).status_code == 200
    # Valid to Porten, but the engine's own validation refuses it (a content part it does not know).
    odd = {"model": "gemma-engine-error", "max_tokens": 2,
           "messages": [{"role": "user", "content": [{"type": "no-such-part", "text": "hi"}]}]}
    for body in (odd, {**odd, "stream": True}):
        response = httpx.post(url, headers=headers, json=body, timeout=120)
        assert response.status_code in (400, 502), response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code", "param"}
        assert error["code"] in {"invalid_request", "engine_error"}
        assert "site-packages" not in response.text and "Traceback" not in response.text
        assert ".py" not in response.text
