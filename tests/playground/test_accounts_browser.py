"""A person who is not staff, in headless Chromium against the live hub: signs in on Porten's own page,
uses the playground (only the models their policy allows), makes an API key on My API keys, sees it
once, and the key works with a script. Screenshots land in test-output/playground/accounts/."""
from __future__ import annotations

import httpx
import pytest
from django.contrib.auth import get_user_model

from porten.models import AccessPolicy
from tests.factories import CatalogModelFactory
from tests.playground.test_browser import PASSWORD, Browser, output_dir

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]


@pytest.fixture
def lin(db):
    """A person who is not staff, three offered models, two of them allowed to her. Made before the
    browser starts: Playwright's sync API runs an event loop in this thread, where the ORM refuses to run."""
    person = get_user_model().objects.create_user("lin", password=PASSWORD)
    for model_id, name in [("acc-small", "Small model"), ("acc-coder", "Coder model"), ("acc-other", "Not for lin")]:
        CatalogModelFactory(model_id=model_id, display_name=name)
    AccessPolicy.objects.create(user=person, allowed_models=["acc-coder", "acc-small"], rpm_limit=120, max_keys=3)
    return person


@pytest.fixture
def browser(live_hub, lin):
    opened = Browser(live_hub.url, output_dir("accounts"))
    yield opened
    opened.close()
    print(f"\nscreenshots: {opened.shots}")


def picker_ids(page) -> list[str]:
    return page.eval_on_selector_all(".model-item", "items => items.map(i => i.dataset.modelId)")


def test_a_person_signs_in_uses_the_playground_and_makes_a_key_that_works(browser, live_hub):
    page, hub = browser.page, live_hub.url

    # Porten's own sign-in page, for an account that is not staff.
    page.goto(hub + "/playground/")
    assert page.url == hub + "/accounts/login/?next=/playground/"
    browser.shot("1-sign-in")
    page.fill("#id_username", "lin")
    page.fill("#id_password", PASSWORD)
    # The playground loads, and the picker lists the models lin may use, after /v1/models answered too.
    with page.expect_response(lambda r: r.url.endswith("/v1/models")) as models_response:
        page.click("input[type=submit]")
        page.wait_for_url(hub + "/playground/")
    assert models_response.value.status == 200
    assert sorted(m["id"] for m in models_response.value.json()["data"]) == ["acc-coder", "acc-small"]
    page.wait_for_selector('.model-item[data-model-id="acc-small"]')
    assert picker_ids(page) == ["acc-coder", "acc-small"]
    nav = page.inner_text("nav.account")
    assert "lin" in nav and "My API keys" in nav and "Sign out" in nav
    assert "Fleet" not in nav and "Admin" not in nav
    assert page.inner_text('.model-item[data-model-id="acc-small"] .model-name') == "Small model"
    browser.shot("2-playground")

    # My API keys: the form offers lin's models; the new key is shown once.
    page.click("text=My API keys")
    page.wait_for_url(hub + "/keys/")
    offered = page.eval_on_selector_all("input[name=models]", "boxes => boxes.map(b => b.value)")
    assert sorted(offered) == ["acc-coder", "acc-small"]
    assert page.get_attribute("#id_rpm_limit", "placeholder") == "at most 120"
    page.fill("#id_name", "my script")
    page.check('input[name=models][value="acc-small"]')
    page.fill("#id_rpm_limit", "60")
    page.click("#create-key button[type=submit]")
    page.wait_for_selector("#new-key")
    raw_key = page.inner_text("#new-key").strip()
    assert raw_key.startswith("pt-") and len(raw_key) > 40
    row = page.inner_text("#keys tbody tr")
    assert "my script" in row and "acc-small" in row and "60 requests/min" in row and "active" in row
    browser.shot("3-key-made")

    page.goto(hub + "/keys/")
    assert page.query_selector("#new-key") is None
    assert raw_key not in page.content(), "the key is shown once, never again"
    assert f"{raw_key[:10]}…" in page.inner_text("#keys"), "its prefix (porten.keys) tells it apart"
    browser.shot("4-keys-later")

    # The key works from a script, within its scope.
    answer = httpx.get(hub + "/v1/models", headers={"Authorization": f"Bearer {raw_key}"}, timeout=30)
    assert answer.status_code == 200
    assert [m["id"] for m in answer.json()["data"]] == ["acc-small"]
    refused = httpx.get(hub + "/v1/models", headers={"Authorization": "Bearer pt-not-a-key"}, timeout=30)
    assert refused.status_code == 401

    # Signing out ends the session: the playground asks to sign in again.
    page.click("nav.account button:has-text('Sign out')")
    page.wait_for_url(hub + "/accounts/login/")
    page.goto(hub + "/playground/")
    assert page.url == hub + "/accounts/login/?next=/playground/"
    assert not browser.console_errors, (browser.console_errors, browser.failed_responses)
    assert not browser.failed_responses, browser.failed_responses
