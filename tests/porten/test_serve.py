"""The hub launcher (python -m porten.serve): daphne with Twisted's unused form parsing and its
second access log turned off, checked in a fresh interpreter as the launcher runs; and a live hub started
through it answers form bodies with a clear 400."""
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent("""
    from unittest import mock

    from daphne import http_protocol, server
    from twisted.web import http

    assert http_protocol.WebRequest(mock.Mock())._parsePOSTFormSubmission is True  # daphne's default

    from porten.serve import _lean_daphne

    _lean_daphne()
    request = http_protocol.WebRequest(mock.Mock())
    assert request._parsePOSTFormSubmission is False, "Twisted would still parse form bodies"
    factory = server.HTTPFactory(mock.Mock())
    assert isinstance(factory, http.HTTPFactory)
    factory._logFile = mock.Mock()
    factory.log(request)
    assert not factory._logFile.write.called, "Twisted would still write its own access log line"
    print("lean")
""")


def test_the_launcher_turns_off_form_parsing_and_twisteds_access_log():
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lean"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("form", ["urlencoded", "multipart"])
def test_a_form_body_on_the_live_hub_is_a_clear_400(live_hub, api_key, form):
    headers = {"Authorization": f"Bearer {api_key}"}
    if form == "urlencoded":
        response = httpx.post(live_hub.url + "/v1/chat/completions", data={"model": "m"}, headers=headers)
    else:
        response = httpx.post(live_hub.url + "/v1/chat/completions", files={"upload": b"x" * 10_000}, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in response.json()["error"]["message"]
