"""Playground fixtures: the fleet's real node worker and Hugging Face endpoint, and signed-in people."""
from __future__ import annotations

import pytest
from django.test import Client

from tests.fleet.conftest import *  # noqa: F401,F403 (hf, node_worker, ...)

PASSWORD = "correct horse battery staple"


@pytest.fixture
def person(django_user_model):
    return django_user_model.objects.create_user(username="ada", password=PASSWORD)


@pytest.fixture
def signed_in(person) -> Client:
    client = Client()
    client.force_login(person)
    return client
