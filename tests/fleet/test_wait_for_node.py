"""manage.py wait_for_node, which `make run` uses before it says Porten is up."""
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from fleet.models import Node

pytestmark = pytest.mark.django_db


@override_settings(PORTEN_NODE_NAME="waited-node")
def test_returns_once_this_node_sends_heartbeats():
    Node.objects.create(name="waited-node", last_heartbeat_at=timezone.now())
    call_command("wait_for_node", timeout=5)


@override_settings(PORTEN_NODE_NAME="waited-node")
@pytest.mark.parametrize("heartbeat_age_s", [None, 3600])
def test_fails_after_the_timeout_while_this_node_is_silent(heartbeat_age_s):
    Node.objects.create(name="other-node", last_heartbeat_at=timezone.now())  # someone else's node is not ours
    if heartbeat_age_s is not None:
        Node.objects.create(name="waited-node", last_heartbeat_at=timezone.now() - timedelta(seconds=heartbeat_age_s))
    with pytest.raises(CommandError, match="node waited-node sent no heartbeat within 1 s"):
        call_command("wait_for_node", timeout=1)
