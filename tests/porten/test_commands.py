"""manage.py create_api_key prints the raw key once, as its last line."""
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from porten.keys import api_key_for
from porten.models import ApiKey

pytestmark = pytest.mark.django_db


def test_create_api_key_prints_a_working_key_last(client):
    out = StringIO()
    call_command("create_api_key", "ci-script", stdout=out)
    raw_key = out.getvalue().strip().splitlines()[-1]
    assert raw_key.startswith("pt-") and len(raw_key) > 30
    assert api_key_for(raw_key).name == "ci-script"
    assert client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw_key}").status_code == 200


def test_create_api_key_refuses_a_blank_name():
    with pytest.raises(CommandError):
        call_command("create_api_key", "   ", stdout=StringIO())
    assert ApiKey.objects.count() == 0


def test_create_api_key_with_the_operator_role_opens_the_operator_api(client):
    out = StringIO()
    call_command("create_api_key", "ops-script", "--role", "operator", stdout=out)
    raw_key = out.getvalue().strip().splitlines()[-1]
    assert api_key_for(raw_key).role == "operator"
    assert client.get("/api/nodes/", HTTP_AUTHORIZATION=f"Bearer {raw_key}").status_code == 200
    plain = StringIO()
    call_command("create_api_key", "plain-script", stdout=plain)
    plain_key = plain.getvalue().strip().splitlines()[-1]
    assert client.get("/api/nodes/", HTTP_AUTHORIZATION=f"Bearer {plain_key}").status_code == 403
