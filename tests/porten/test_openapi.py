"""Porten's OpenAPI schema: valid OpenAPI 3, describing /v1 and the operator API, and fuzzed by
schemathesis against a live hub: no 5xx except the documented 503s, statuses and content types
as documented."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, status_code_conformance

from porten.keys import api_key_create

EXAMPLES = 10  # per operation and mode: the whole fuzz stays well under a minute
DOCUMENTED_503 = {"model_warming", "model_load_failed", "no_capacity", "fleet_busy"}


def test_the_schema_is_valid_openapi_and_covers_v1_and_the_operator_api(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    validate(schema)
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                 "/public/v1/models/warming", "/api/catalog/", "/api/nodes/{name}/drain", "/api/instances/",
                 "/api/keys/"]:
        assert path in schema["paths"], path
    assert schema["paths"]["/api/catalog/"]["get"]["responses"]["403"]
    assert "503" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_the_docs_page_needs_no_internet(client):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    assert b"cdn.jsdelivr" not in page.content and b"unpkg.com" not in page.content
    assert b"/static/drf_spectacular_sidecar/" in page.content


def _operations(schema):
    for result in schema.get_all_operations():
        yield result.ok()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_an_undocumented_server_error(live_hub, mode):
    _, raw_key = api_key_create(name="fuzz", role="operator")
    headers = {"Authorization": f"Bearer {raw_key}", "X-Porten-Warmup-Budget": "0"}
    schema = schemathesis.openapi.from_url(live_hub.url + "/api/schema/?format=json")
    failures: list[str] = []
    calls = 0
    for operation in _operations(schema):
        if "revoke" in operation.path:
            continue  # revoking keys at random would revoke the fuzzer's own

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            nonlocal calls
            case.headers = {**(case.headers or {}), **headers}
            response = case.call(base_url=live_hub.url, timeout=30)
            calls += 1
            where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            if response.status_code >= 500:
                code = (response.json().get("error") or {}).get("code") if "json" in response.headers.get(
                    "content-type", "") else None
                if not (response.status_code == 503 and code in DOCUMENTED_503):
                    failures.append(where)
            if "Traceback" in response.text or "site-packages" in response.text:
                failures.append("internals leaked: " + where)
            if mode == GenerationMode.POSITIVE:
                try:
                    case.validate_response(response, checks=[status_code_conformance, content_type_conformance])
                except Exception as problem:
                    failures.append(f"{where}\n  {str(problem)[:300]}")

        try:
            fuzz()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, operation.label  # nothing to break in, e.g., a bare GET
    assert calls > 100, "the fuzzer ran"
    assert not failures, "\n".join(failures[:20])
