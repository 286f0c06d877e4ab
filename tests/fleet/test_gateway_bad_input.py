"""Bad input gets a clear 4xx naming the problem, and loads nothing."""
import json

import pytest

from fleet.models import Instance
from tests.factories import CatalogModelFactory

pytestmark = pytest.mark.django_db

CHAT = "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]

CASES = [
    # (name, path, body (raw str or object), extra headers, status, param, words in the message)
    ("invalid json", CHAT, "{not json", {}, 400, None, "not valid JSON"),
    ("not an object", CHAT, [1, 2], {}, 400, None, "JSON object"),
    ("missing model", CHAT, {"messages": OK_MESSAGES}, {}, 400, "model", "'model'"),
    ("model not a string", CHAT, {"model": 7, "messages": OK_MESSAGES}, {}, 400, "model", "'model'"),
    ("missing messages", CHAT, {"model": "bad-in"}, {}, 400, "messages", "'messages'"),
    ("empty messages", CHAT, {"model": "bad-in", "messages": []}, {}, 400, "messages", "non-empty"),
    ("message not an object", CHAT, {"model": "bad-in", "messages": ["hi"]}, {}, 400, "messages[0]", "object"),
    ("bad role", CHAT, {"model": "bad-in", "messages": [{"role": "wizard", "content": "x"}]}, {}, 400,
     "messages[0].role", "role"),
    ("missing content", CHAT, {"model": "bad-in", "messages": [{"role": "user"}]}, {}, 400,
     "messages[0].content", "content"),
    ("stream not bool", CHAT, {"model": "bad-in", "messages": OK_MESSAGES, "stream": "yes"}, {}, 400, "stream", "true or false"),
    ("negative max_tokens", CHAT, {"model": "bad-in", "messages": OK_MESSAGES, "max_tokens": -5}, {}, 400,
     "max_tokens", "positive integer"),
    ("max_tokens over context", CHAT, {"model": "bad-in", "messages": OK_MESSAGES, "max_tokens": 100000}, {}, 400,
     "max_tokens", "context length"),
    ("temperature out of range", CHAT, {"model": "bad-in", "messages": OK_MESSAGES, "temperature": 5}, {}, 400,
     "temperature", "between"),
    ("bad stop", CHAT, {"model": "bad-in", "messages": OK_MESSAGES, "stop": [1]}, {}, 400, "stop", "stop"),
    ("missing prompt", "/v1/completions", {"model": "bad-in"}, {}, 400, "prompt", "'prompt'"),
    ("bad prompt", "/v1/completions", {"model": "bad-in", "prompt": {"a": 1}}, {}, 400, "prompt", "'prompt'"),
    ("bad budget header", CHAT, {"model": "bad-in", "messages": OK_MESSAGES}, {"HTTP_X_PORTEN_WARMUP_BUDGET": "soon"},
     400, "X-Porten-Warmup-Budget", "seconds"),
    ("negative budget", CHAT, {"model": "bad-in", "messages": OK_MESSAGES}, {"HTTP_X_PORTEN_WARMUP_BUDGET": "-1"},
     400, "X-Porten-Warmup-Budget", "zero or more"),
    ("unknown model", CHAT, {"model": "who-dis", "messages": OK_MESSAGES}, {}, 404, "model", "does not exist"),
    ("disabled model", CHAT, {"model": "bad-off", "messages": OK_MESSAGES}, {}, 404, "model", "not offered"),
    ("too large", CHAT, {"model": "bad-in", "messages": [{"role": "user", "content": "x" * 5_000_000}]}, {}, 413,
     None, "larger than"),
]


@pytest.mark.parametrize("name,path,body,headers,status,param,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx_and_loads_nothing(client, auth_headers, name, path, body, headers, status,
                                                       param, words):
    CatalogModelFactory(model_id="bad-in")
    CatalogModelFactory(model_id="bad-off", enabled=False)
    raw = body if isinstance(body, str) else json.dumps(body)
    response = client.post(path, data=raw, content_type="application/json", **auth_headers, **headers)
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]
    assert not Instance.objects.exists(), "nothing is loaded for bad input"


def test_missing_key_is_401_before_anything_else(client):
    response = client.post(CHAT, data="{bad", content_type="application/json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_get_is_405_and_unknown_route_404(client, auth_headers):
    response = client.get(CHAT, **auth_headers)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    response = client.get("/v1/embeddingz", **auth_headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
