"""Settings come from the environment; production refuses to start without what it needs."""
import subprocess
import sys

from tests.conftest import REPO_ROOT

CHECK = "import django; django.setup(); from django.conf import settings; print(settings.DATABASES['default']['ENGINE'])"


def run_settings(env_extra: dict, tmp_path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "porten.settings", "PORTEN_VAR_DIR": str(tmp_path),
           **env_extra}
    return subprocess.run([sys.executable, "-c", CHECK], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_production_names_every_missing_variable(tmp_path):
    result = run_settings({"PORTEN_ENV": "production", "REDIS_URL": "redis://r:6379/0"}, tmp_path)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    for name in ("SECRET_KEY", "DATABASE_URL", "PORTEN_ALLOWED_HOSTS"):
        assert name in result.stderr
    assert "REDIS_URL," not in result.stderr.split("needs these environment variables:")[-1]


def test_production_starts_with_postgres_url(tmp_path):
    result = run_settings({"PORTEN_ENV": "production", "SECRET_KEY": "x" * 50, "REDIS_URL": "redis://r:6379/0",
                           "DATABASE_URL": "postgres://u:p@db:5432/porten", "PORTEN_ALLOWED_HOSTS": "porten.example"},
                          tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "django.db.backends.postgresql"


def test_development_defaults_keep_a_generated_secret_key(tmp_path):
    first = run_settings({}, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "django.db.backends.sqlite3"
    key = (tmp_path / "secret_key").read_text()
    assert len(key) > 40
    assert run_settings({}, tmp_path).returncode == 0
    assert (tmp_path / "secret_key").read_text() == key, "the key is kept, not regenerated"


def test_bad_number_is_a_clear_error(tmp_path):
    result = run_settings({"PORTEN_PORT": "eighty"}, tmp_path)
    assert result.returncode != 0
    assert "PORTEN_PORT must be an integer" in result.stderr


def test_production_settings_pass_djangos_deploy_checks(tmp_path):
    import secrets

    env = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "porten.settings", "PORTEN_VAR_DIR": str(tmp_path),
           "PORTEN_ENV": "production", "SECRET_KEY": secrets.token_urlsafe(50), "REDIS_URL": "redis://r:6379/0",
           "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3", "PORTEN_ALLOWED_HOSTS": "porten.example"}
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
