"""A person's own pages: Porten's sign-in (any account; the admin's stays staff only), My API keys
(create within the policy, shown once; revoke their own only) and their usage per model and day."""
from __future__ import annotations

import json
import re
from datetime import datetime, time, timedelta, timezone as dt_timezone

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from porten.keys import api_key_create, api_key_for
from porten.models import AccessPolicy, ApiKey, UsageRecord
from tests.factories import CatalogModelFactory

pytestmark = pytest.mark.django_db

PASSWORD = "a long test password"
RAW_KEY = re.compile(r"pt-[A-Za-z0-9_-]{40,}")


@pytest.fixture
def person(django_user_model):
    return django_user_model.objects.create_user(username="ada", password=PASSWORD)


@pytest.fixture
def other(django_user_model):
    return django_user_model.objects.create_user(username="bob", password=PASSWORD)


@pytest.fixture
def signed_in(person) -> Client:
    client = Client()
    client.force_login(person)
    return client


@pytest.fixture
def offered_three(db):
    for model_id in ("pg-alpha", "pg-beta", "pg-gamma"):
        CatalogModelFactory(model_id=model_id, display_name=model_id.replace("pg-", "Model ").title())


@pytest.fixture
def policy(person, offered_three) -> AccessPolicy:
    return AccessPolicy.objects.create(user=person, allowed_models=["pg-alpha", "pg-beta"], rpm_limit=60,
                                       tpm_limit=20000, max_keys=2)


def create(client: Client, **fields):
    data = {"name": "laptop", "models": [], "expires_on": "", "rpm_limit": "", "tpm_limit": "", "max_concurrent": ""}
    data.update(fields)
    return client.post("/keys/", data)


def form_errors(response) -> str:
    """What the form says, as the person reads it."""
    html = response.content.decode()
    return " ".join(re.findall(r'class="(?:form-errors|field-error)"[^>]*>(.*?)</(?:div|span)>', html, re.S))


# --- signing in and out -----------------------------------------------------------------------

def test_a_person_who_is_not_staff_signs_in_on_porten_s_page_and_the_admin_still_refuses_them(person):
    page = Client().get("/accounts/login/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="id_username"' in html and 'id="id_password"' in html and "/static/playground/app.css" in html

    browser = Client()
    response = browser.post("/accounts/login/", {"username": "ada", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/playground/"
    assert browser.get("/playground/").status_code == 200
    assert browser.get("/keys/").status_code == 200

    admin = Client()
    refused = admin.post("/admin/login/", {"username": "ada", "password": PASSWORD, "next": "/admin/"})
    assert refused.status_code == 200, "the admin's sign-in does not let a non-staff account in"
    assert "staff account" in refused.content.decode()
    assert admin.get("/admin/").status_code == 302


def test_a_wrong_password_is_refused_with_a_message(person):
    client = Client()
    response = client.post("/accounts/login/", {"username": "ada", "password": "not it"})
    assert response.status_code == 200
    assert "Please enter a correct username and password" in response.content.decode()
    assert client.get("/keys/").status_code == 302


def test_sign_in_goes_back_to_the_page_asked_for(person):
    client = Client()
    response = client.post("/accounts/login/", {"username": "ada", "password": PASSWORD, "next": "/keys/"})
    assert response["Location"] == "/keys/"
    offsite = Client().post("/accounts/login/", {"username": "ada", "password": PASSWORD,
                                                 "next": "https://evil.example/"})
    assert offsite["Location"] == "/playground/", "never sent to another site after signing in"


def test_sign_out_is_a_post_and_ends_the_session(signed_in):
    assert signed_in.get("/accounts/logout/").status_code == 405
    response = signed_in.post("/accounts/logout/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/"
    assert signed_in.get("/keys/")["Location"] == "/accounts/login/?next=/keys/"


def test_pages_for_signed_in_people_send_others_to_porten_s_sign_in(client, person):
    assert client.get("/playground/")["Location"] == "/accounts/login/?next=/playground/"
    assert client.get("/keys/")["Location"] == "/accounts/login/?next=/keys/"
    key, _ = api_key_create(name="theirs", user=person)
    response = client.post(f"/keys/{key.pk}/revoke")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    assert ApiKey.objects.get(pk=key.pk).is_active


def test_the_fleet_page_stays_for_staff_and_sends_a_person_to_sign_in_as_someone_else(signed_in):
    response = signed_in.get("/fleet/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/?next=/fleet/"
    page = signed_in.get(response["Location"]).content.decode()
    assert "You are signed in as <strong>ada</strong>, which may not open that page" in page


# --- the playground for anyone signed in ------------------------------------------------------
# The async views read a person's scope on a worker thread with a connection of its own, which sees
# only committed rows: these tests commit.

@pytest.mark.django_db(transaction=True)
def test_the_playground_lists_only_the_models_a_person_may_use_and_links_their_keys(signed_in, policy):
    html = signed_in.get("/playground/").content.decode()
    assert 'data-model-id="pg-alpha"' in html and 'data-model-id="pg-beta"' in html
    assert 'data-model-id="pg-gamma"' not in html
    config = json.loads(html.split('<script id="playground-config" type="application/json">')[1].split("</script>")[0])
    assert [m["id"] for m in config["catalog"]] == ["pg-alpha", "pg-beta"]
    assert 'href="/keys/"' in html and 'action="/accounts/logout/"' in html
    assert 'href="/fleet/"' not in html and 'href="/admin/"' not in html, "Fleet and Admin are for staff"


@pytest.mark.django_db(transaction=True)
def test_staff_see_every_model_and_the_fleet_and_admin_links(django_user_model, offered_three):
    AccessPolicy.objects.create(group=Group.objects.create(name="everyone"), allowed_models=["pg-alpha"])
    grace = django_user_model.objects.create_user("grace", password=PASSWORD, is_staff=True)
    grace.groups.add(Group.objects.get(name="everyone"))
    client = Client()
    client.force_login(grace)
    html = client.get("/playground/").content.decode()
    assert all(f'data-model-id="{m}"' in html for m in ("pg-alpha", "pg-beta", "pg-gamma"))
    assert 'href="/fleet/"' in html and 'href="/admin/"' in html and 'href="/keys/"' in html


@pytest.mark.django_db(transaction=True)
def test_prewarm_refuses_a_model_outside_the_person_s_scope(person, policy):
    client = Client(enforce_csrf_checks=True)
    client.force_login(person)
    client.get("/playground/")
    response = client.post("/playground/prewarm", json.dumps({"model": "pg-gamma"}), content_type="application/json",
                           HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


# --- My API keys ------------------------------------------------------------------------------

def test_the_form_offers_the_models_and_shows_the_limits_of_the_policy(signed_in, policy):
    html = signed_in.get("/keys/").content.decode()
    assert 'value="pg-alpha"' in html and 'value="pg-beta"' in html
    assert 'value="pg-gamma"' not in html, "a model the policy does not allow is not offered on the form"
    assert 'max="60"' in html and "At most 60" in html and "At most 20000" in html
    assert "0 active of at most 2" in html
    assert "No key yet" in html


def test_a_key_made_within_the_policy_is_shown_once(signed_in, person, policy):
    response = create(signed_in, name="notebook", models=["pg-alpha"], rpm_limit="30", max_concurrent="3")
    assert response.status_code == 200
    html = response.content.decode()
    [raw_key] = set(RAW_KEY.findall(html))
    key = ApiKey.objects.get(user=person)
    assert api_key_for(raw_key) == key
    assert (key.name, key.allowed_models, key.role) == ("notebook", ["pg-alpha"], "user")
    assert (key.rpm_limit, key.tpm_limit, key.max_concurrent) == (30, 20000, 3), "an empty limit takes the policy's"
    assert key.expires_at is None
    assert "shown only this once" in html
    assert "no-store" in response["Cache-Control"], "no cache keeps a copy of the key"

    later = signed_in.get("/keys/").content.decode()
    assert raw_key not in later and not RAW_KEY.search(later), "the key is never shown again"
    assert f"{key.prefix}…" in later and "notebook" in later
    assert "30 requests/min" in later and "20000 tokens/min" in later and "3 at once" in later


def test_no_models_ticked_means_every_model_the_policy_allows(signed_in, person, policy):
    create(signed_in, name="all mine")
    assert ApiKey.objects.get(user=person).allowed_models == ["pg-alpha", "pg-beta"]


def test_a_person_without_a_policy_may_use_every_offered_model_without_limits(signed_in, person, offered_three):
    html = signed_in.get("/keys/").content.decode()
    assert all(f'value="{m}"' in html for m in ("pg-alpha", "pg-beta", "pg-gamma"))
    response = create(signed_in, name="free", models=["pg-gamma"], rpm_limit="1000000")
    assert response.status_code == 200 and RAW_KEY.search(response.content.decode())
    key = ApiKey.objects.get(user=person)
    assert (key.allowed_models, key.rpm_limit, key.tpm_limit) == (["pg-gamma"], 1000000, None)


def test_an_expiry_date_lasts_to_the_end_of_that_day(signed_in, person, policy):
    day = (timezone.now() + timedelta(days=3)).date()
    create(signed_in, name="short-lived", expires_on=day.isoformat())
    key = ApiKey.objects.get(user=person)
    assert key.expires_at == datetime.combine(day + timedelta(days=1), time.min, tzinfo=dt_timezone.utc)


@pytest.mark.parametrize("fields, message", [
    ({"models": ["pg-gamma"]}, "You may use only pg-alpha, pg-beta"),
    ({"rpm_limit": "61"}, "at most 60"),
    ({"tpm_limit": "20001"}, "at most 20000"),
    ({"expires_on": "2001-01-01"}, "The expiry must be in the future"),
    ({"models": ["no-such-model"]}, "no-such-model is not an offered model"),
    ({"name": "   "}, "This field is required"),
    ({"rpm_limit": "0"}, "greater than or equal to 1"),
    ({"rpm_limit": "lots"}, "Enter a whole number"),
    ({"tpm_limit": str(2**40)}, "less than or equal to"),
    ({"expires_on": "someday"}, "Enter a valid date"),
], ids=["model-not-allowed", "rpm-above-policy", "tpm-above-policy", "expired", "unknown-model", "no-name",
        "zero-limit", "not-a-number", "too-big", "bad-date"])
def test_a_key_outside_the_policy_or_with_bad_input_is_refused_on_the_form(signed_in, person, policy, fields, message):
    response = create(signed_in, **fields)
    assert response.status_code == 400
    assert message in form_errors(response)
    html = response.content.decode()
    assert not RAW_KEY.search(html) and "Traceback" not in html
    assert not ApiKey.objects.filter(user=person).exists(), "nothing is created"


def test_no_more_keys_than_the_policy_allows(signed_in, person, policy):
    for name in ("one", "two"):
        assert create(signed_in, name=name).status_code == 200
    response = create(signed_in, name="three")
    assert response.status_code == 400
    assert "You have 2 active keys, the most you may; revoke one first" in form_errors(response)
    assert ApiKey.objects.filter(user=person).count() == 2
    # Revoking one makes room again.
    signed_in.post(f"/keys/{ApiKey.objects.get(name='one').pk}/revoke")
    assert create(signed_in, name="three").status_code == 200
    assert ApiKey.objects.filter(user=person, is_active=True).count() == 2


def test_a_person_revokes_their_own_key_with_a_csrf_checked_post(person, policy):
    key, raw_key = api_key_create(name="old laptop", user=person)
    client = Client(enforce_csrf_checks=True)
    client.force_login(person)
    page = client.get("/keys/").content.decode()
    assert f'action="/keys/{key.pk}/revoke"' in page
    assert client.post(f"/keys/{key.pk}/revoke").status_code == 403, "no CSRF token, no revoking"
    assert ApiKey.objects.get(pk=key.pk).is_active

    response = client.post(f"/keys/{key.pk}/revoke", {"csrfmiddlewaretoken": client.cookies["csrftoken"].value})
    assert response.status_code == 302 and response["Location"] == "/keys/"
    assert not ApiKey.objects.get(pk=key.pk).is_active
    assert api_key_for(raw_key) is None
    after = client.get("/keys/").content.decode()
    assert "Revoked old laptop" in after
    assert 'data-status="revoked"' in after and f'action="/keys/{key.pk}/revoke"' not in after


def test_someone_else_s_key_is_not_found_and_not_listed(signed_in, person, other):
    theirs, _ = api_key_create(name="bob's secret project", user=other)
    unowned, _ = api_key_create(name="service account")
    for key in (theirs, unowned):
        assert signed_in.post(f"/keys/{key.pk}/revoke").status_code == 404
        assert ApiKey.objects.get(pk=key.pk).is_active
    assert signed_in.post("/keys/999999/revoke").status_code == 404
    html = signed_in.get("/keys/").content.decode()
    assert "bob&#x27;s secret project" not in html and "service account" not in html
    assert signed_in.get(f"/keys/{theirs.pk}/revoke").status_code == 405


def test_an_expired_key_is_marked_expired(signed_in, person):
    key, _ = api_key_create(name="was short", user=person, expires_at=timezone.now() + timedelta(seconds=30))
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(days=1))
    assert f'data-key-id="{key.pk}" data-status="expired"' in signed_in.get("/keys/").content.decode()


# --- usage ------------------------------------------------------------------------------------

def test_the_usage_table_sums_a_person_s_own_use_per_model_and_day(signed_in, person, other):
    key, _ = api_key_create(name="usage", user=person)
    today = datetime.combine(timezone.now().date(), time.min, tzinfo=dt_timezone.utc)
    yesterday, before = today - timedelta(days=1), today - timedelta(days=2)

    def used(hour, model_id, requests, prompt, completion, *, user=person, api_key=key):
        UsageRecord.objects.create(hour=hour, user=user, api_key=api_key, model_id=model_id, requests=requests,
                                   prompt_tokens=prompt, completion_tokens=completion)

    used(yesterday + timedelta(hours=1), "pg-alpha", 2, 100, 10)
    used(yesterday + timedelta(hours=7), "pg-alpha", 3, 200, 20)
    used(yesterday + timedelta(hours=7), "pg-alpha", 1, 50, 5, api_key=None)  # the playground, by session
    used(yesterday + timedelta(hours=9), "pg-beta", 1, 40, 4)
    used(before + timedelta(hours=23), "pg-alpha", 4, 400, 40)
    used(yesterday + timedelta(hours=2), "pg-alpha", 100, 9999, 999, user=other, api_key=None)  # someone else's
    used(today - timedelta(days=45), "pg-alpha", 100, 9999, 999)  # older than the page shows

    response = signed_in.get("/keys/")
    usage = response.context["usage"]
    assert [(r["day"].date(), r["model_id"], r["requests"], r["prompt_tokens"], r["completion_tokens"])
            for r in usage.rows] == [
        (yesterday.date(), "pg-alpha", 6, 350, 35),
        (yesterday.date(), "pg-beta", 1, 40, 4),
        (before.date(), "pg-alpha", 4, 400, 40),
    ]
    assert [(r["model_id"], r["requests"], r["total_tokens"]) for r in usage.by_model] == [
        ("pg-alpha", 10, 825), ("pg-beta", 1, 44)]
    assert usage.total == {"requests": 11, "prompt_tokens": 790, "completion_tokens": 79, "total_tokens": 869}

    html = response.content.decode()
    row = html.split(f'data-day="{yesterday.date().isoformat()}" data-model="pg-alpha">')[1].split("</tr>")[0]
    assert re.findall(r"<td>(\d+)</td>", row) == ["6", "350", "35", "385"]
    total = html.split('id="usage-total">')[1].split("</tr>")[0]
    assert re.findall(r"<td>(\d+)</td>", total) == ["11", "790", "79", "869"]


def test_no_usage_says_so(signed_in):
    assert "No use in the last 30 days." in signed_in.get("/keys/").content.decode()


# --- the admin --------------------------------------------------------------------------------

@pytest.fixture
def operator(django_user_model) -> Client:
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD))
    return client


def test_operators_set_access_policies_and_read_usage_in_the_admin(operator, person, offered_three):
    response = operator.post("/admin/porten/accesspolicy/add/", {
        "user": person.pk, "allowed_models": '["pg-alpha"]', "rpm_limit": "10", "tpm_limit": "", "max_concurrent": "",
        "max_keys": "3"})
    assert response.status_code == 302, response.content.decode()[:2000]
    policy = AccessPolicy.objects.get(user=person)
    assert (policy.allowed_models, policy.rpm_limit, policy.max_keys) == (["pg-alpha"], 10, 3)

    refused = operator.post("/admin/porten/accesspolicy/add/", {
        "allowed_models": '"pg-alpha"', "rpm_limit": "", "tpm_limit": "", "max_concurrent": "", "max_keys": "3"})
    assert refused.status_code == 200 and "A JSON list of catalog ids" in refused.content.decode()
    assert AccessPolicy.objects.count() == 1

    UsageRecord.objects.create(hour=timezone.now().replace(minute=0, second=0, microsecond=0), user=person,
                               model_id="pg-alpha", requests=1, prompt_tokens=5, completion_tokens=7)
    listing = operator.get("/admin/porten/usagerecord/")
    assert listing.status_code == 200 and "pg-alpha" in listing.content.decode()
    assert operator.get("/admin/porten/usagerecord/add/").status_code == 403


def test_an_operator_makes_a_key_for_a_person_with_its_scope_in_the_admin(operator, person):
    expires = (timezone.now() + timedelta(days=7)).replace(microsecond=0)
    response = operator.post("/admin/porten/apikey/add/", {
        "name": "for ada", "role": "user", "is_active": "on", "user": person.pk,
        "allowed_models": '["pg-alpha"]', "expires_at_0": expires.strftime("%Y-%m-%d"),
        "expires_at_1": expires.strftime("%H:%M:%S"), "rpm_limit": "5", "tpm_limit": "", "max_concurrent": "2"},
        follow=True)
    assert response.status_code == 200
    assert "it is not shown again" in response.content.decode()
    key = ApiKey.objects.get(name="for ada")
    assert (key.user, key.allowed_models, key.expires_at, key.rpm_limit, key.tpm_limit, key.max_concurrent) == (
        person, ["pg-alpha"], expires, 5, None, 2)

