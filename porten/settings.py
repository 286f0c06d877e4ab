"""Porten's settings: every knob from the environment, with defaults that work on one machine."""
from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from exc


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from exc


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


PORTEN_ENV = env_str("PORTEN_ENV", "development")
PRODUCTION = PORTEN_ENV == "production"

if PRODUCTION:
    # Production never falls back to one-machine defaults: name every missing variable at once.
    missing = [name for name in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL", "PORTEN_ALLOWED_HOSTS") if not os.environ.get(name)]
    if missing:
        raise ImproperlyConfigured(
            "PORTEN_ENV=production needs these environment variables: " + ", ".join(missing)
        )

# Local state (SQLite file, generated secret key, model store, engine logs) lives here.
VAR_DIR = Path(env_str("PORTEN_VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    given = os.environ.get("SECRET_KEY")
    if given:
        return given
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        # Written once, then reused, so sessions survive restarts of `make run`.
        tmp = key_file.with_suffix(".tmp")
        tmp.write_text(secrets.token_urlsafe(50))
        tmp.chmod(0o600)
        tmp.replace(key_file)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("PORTEN_DEBUG", not PRODUCTION)
ALLOWED_HOSTS = [h.strip() for h in env_str("PORTEN_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in env_str("PORTEN_CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()]

# Production is served over HTTPS (by the hub or a proxy in front that sets X-Forwarded-Proto):
# secure cookies, a redirect to HTTPS and HSTS. PORTEN_HTTPS=false turns them off (an HTTP-only lab).
HTTPS = env_bool("PORTEN_HTTPS", PRODUCTION)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = env_int("PORTEN_HSTS_SECONDS", 31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("PORTEN_HSTS_SUBDOMAINS", HTTPS)
SECURE_HSTS_PRELOAD = env_bool("PORTEN_HSTS_PRELOAD", HTTPS)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if HTTPS else None
# Health checks come over plain HTTP from the load balancer.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files served from here: /api/docs/ works without internet
    "channels",
    "porten",
    "catalog",
    "fleet",
    "fleet.agent",
    "playground",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "porten.urls"
ASGI_APPLICATION = "porten.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

SQLITE_PATH = Path(env_str("PORTEN_SQLITE_PATH", str(VAR_DIR / "porten.sqlite3")))
DATABASES = {
    "default": dj_database_url.parse(env_str("DATABASE_URL", f"sqlite:///{SQLITE_PATH}"), conn_max_age=0)
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (hub, node worker, beat) share the file: WAL plus a busy timeout
    # keeps writers from failing with "database is locked" under progress updates.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Tests run subprocesses (worker, daphne) against the test database, so it must be a file.
    DATABASES["default"]["TEST"] = {"NAME": env_str("PORTEN_TEST_SQLITE_PATH", str(VAR_DIR / "test.sqlite3"))}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [] if not PRODUCTION else [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
# Porten's own sign-in page, for anyone with an account; the admin keeps its own (staff only).
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/playground/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL]},
    }
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["porten.drf.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "porten.api_errors.drf_exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# The OpenAPI schema at /api/schema/: the operator API from its views, /v1's token routes and the
# warming endpoint (plain async views) added by porten.openapi.
SPECTACULAR_SETTINGS = {
    "TITLE": "Porten",
    "DESCRIPTION": "An OpenAI-compatible API (/v1) over a fleet of LLMs loaded on demand, and the operator "
                   "API (/api/) that manages the catalog, nodes, instances and API keys.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "porten.openapi.add_gateway_paths"],
    "COMPONENT_SPLIT_REQUEST": True,
}

# Celery: long, idempotent tasks on Redis. The visibility timeout outlasts the longest
# download so a slow load is never handed to a second worker while the first still runs.
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("PORTEN_VISIBILITY_TIMEOUT_S", 12 * 3600)}
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_DEFAULT_QUEUE = "hub"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Porten knobs -------------------------------------------------------------------------
PORTEN_PORT = env_int("PORTEN_PORT", 8000)
PORTEN_NODE_NAME = env_str("PORTEN_NODE_NAME", socket.gethostname().split(".")[0].lower() or "local")
# The address the hub dials to reach this node's engines, and the one they listen on (a bind
# address of 0.0.0.0 serves every interface, behind NAT say, while the hub dials the address).
PORTEN_NODE_ADDRESS = env_str("PORTEN_NODE_ADDRESS", "127.0.0.1")
PORTEN_ENGINE_BIND = env_str("PORTEN_ENGINE_BIND", PORTEN_NODE_ADDRESS)
# Ports engines may listen on, "FIRST-LAST" (for a firewall between hub and nodes); empty: any free port.
PORTEN_ENGINE_PORTS = env_str("PORTEN_ENGINE_PORTS", "")
if PORTEN_ENGINE_PORTS and not re.fullmatch(r"\d{1,5}(-\d{1,5})?", PORTEN_ENGINE_PORTS):
    raise ImproperlyConfigured(f"PORTEN_ENGINE_PORTS must look like 30000-30099, got {PORTEN_ENGINE_PORTS!r}")
PORTEN_MODEL_DIR = Path(env_str("PORTEN_MODEL_DIR", str(VAR_DIR / "models")))
PORTEN_ENGINE_LOG_DIR = Path(env_str("PORTEN_ENGINE_LOG_DIR", str(VAR_DIR / "logs" / "engines")))
# CPU nodes have no NVML: their "VRAM" is a memory budget (0 = a share of this machine's RAM).
PORTEN_NODE_MEMORY_MB = env_int("PORTEN_NODE_MEMORY_MB", 0)
PORTEN_HEARTBEAT_S = env_float("PORTEN_HEARTBEAT_S", 10.0)
PORTEN_SUPERVISE_S = env_float("PORTEN_SUPERVISE_S", 2.0)
# A running engine that answers no liveness check for this long (hung, or stopped) is failed and stopped.
PORTEN_LIVENESS_S = env_float("PORTEN_LIVENESS_S", 20.0)
PORTEN_ENGINE_LOAD_TIMEOUT_S = env_float("PORTEN_ENGINE_LOAD_TIMEOUT_S", 600.0)
# A download that fails is asked again after 0.5 s, doubling up to this long, 6 tries without progress in all.
PORTEN_DOWNLOAD_BACKOFF_MAX_S = env_float("PORTEN_DOWNLOAD_BACKOFF_MAX_S", 8.0)
PORTEN_LLAMA_SERVER_BIN = env_str("PORTEN_LLAMA_SERVER_BIN", "")
PORTEN_LLAMA_SERVER_PARALLEL = env_int("PORTEN_LLAMA_SERVER_PARALLEL", 1)  # llama-server's --parallel slots
PORTEN_VLLM_BIN = env_str("PORTEN_VLLM_BIN", "vllm")
PORTEN_PROGRESS_INTERVAL_S = env_float("PORTEN_PROGRESS_INTERVAL_S", 0.25)

PORTEN_WARMUP_BUDGET_S = env_float("PORTEN_WARMUP_BUDGET_S", 300.0)
PORTEN_WARMUP_BUDGET_MAX_S = env_float("PORTEN_WARMUP_BUDGET_MAX_S", 1800.0)
PORTEN_DEMAND_WINDOW_S = env_float("PORTEN_DEMAND_WINDOW_S", 600.0)
PORTEN_MIN_RESIDENCY_S = env_float("PORTEN_MIN_RESIDENCY_S", 120.0)
PORTEN_DRAIN_DEADLINE_S = env_float("PORTEN_DRAIN_DEADLINE_S", 30.0)
# 5 s rather than 10: fewer user-seconds of waiting in bench/simulate.py (docs/performance.md).
PORTEN_BUSY_AGING_S = env_float("PORTEN_BUSY_AGING_S", 5.0)
PORTEN_IDLE_SWEEP_S = env_float("PORTEN_IDLE_SWEEP_S", 30.0)
# A load still queued after this long on a live node loading nothing else lost its message: sent again.
PORTEN_REQUEUE_AFTER_S = env_float("PORTEN_REQUEUE_AFTER_S", 60.0)
PORTEN_AUTOSCALE_S = env_float("PORTEN_AUTOSCALE_S", 2.0)  # how often replicas and draining nodes are looked at
PORTEN_SCALE_OUT_AFTER_S = env_float("PORTEN_SCALE_OUT_AFTER_S", 4.0)  # busier than target this long: one more replica
PORTEN_MAX_BODY_BYTES = env_int("PORTEN_MAX_BODY_BYTES", 4 * 1024 * 1024)
# /public/v1/models/warming without a key or session: on, anyone may follow a load (and so learn
# which ids are offered); off, it takes a key or a session and answers within the caller's scope.
PORTEN_PUBLIC_WARMING = env_bool("PORTEN_PUBLIC_WARMING", True)
# Bad API keys one client address may send per minute before it gets 429s (guessing keys is slowed).
PORTEN_BAD_KEYS_PER_MINUTE = env_int("PORTEN_BAD_KEYS_PER_MINUTE", 20)
PORTEN_PREWARM_ON_PICK = env_bool("PORTEN_PREWARM_ON_PICK", True)
PORTEN_UPSTREAM_TIMEOUT_S = env_float("PORTEN_UPSTREAM_TIMEOUT_S", 600.0)
# A streamed request waiting for a cold model gets an SSE comment this often (proxies keep it open).
PORTEN_STREAM_KEEPALIVE_S = env_float("PORTEN_STREAM_KEEPALIVE_S", 10.0)
# GET /metrics wants 'Authorization: Bearer <this>' when set; empty: open (keep it on a private network).
PORTEN_METRICS_TOKEN = env_str("PORTEN_METRICS_TOKEN", "")
DATA_UPLOAD_MAX_MEMORY_SIZE = PORTEN_MAX_BODY_BYTES
CSRF_FAILURE_VIEW = "porten.errors.csrf_failure_view"
# Flower, as scripts/flower.sh starts it (that script reads the same variables, and the password:
# PORTEN_FLOWER_PASSWORD, else one it generates once into $PORTEN_VAR_DIR/flower_password).
# The hub only links to it from the fleet page.
PORTEN_FLOWER_HOST = env_str("PORTEN_FLOWER_HOST", "127.0.0.1")
PORTEN_FLOWER_PORT = env_int("PORTEN_FLOWER_PORT", 5555)
PORTEN_FLOWER_USER = env_str("PORTEN_FLOWER_USER", "admin")

# Tokens used per key, model and hour, from the engines' usage (off: nothing recorded; limits still apply).
PORTEN_USAGE_ENABLED = env_bool("PORTEN_USAGE_ENABLED", True)
# Usage tallied by the hub processes moves from Redis into the database this often.
PORTEN_USAGE_PERSIST_S = env_float("PORTEN_USAGE_PERSIST_S", 10.0)

CELERY_BEAT_SCHEDULE = {
    "unload-idle-instances": {"task": "fleet.tasks.unload_idle_instances", "schedule": PORTEN_IDLE_SWEEP_S},
    "restore-evicted-models": {"task": "fleet.tasks.restore_evicted_models", "schedule": PORTEN_IDLE_SWEEP_S},
    "fail-lost-nodes": {"task": "fleet.tasks.fail_lost_nodes", "schedule": PORTEN_HEARTBEAT_S / 2},
    "autoscale-replicas": {"task": "fleet.tasks.autoscale_replicas", "schedule": PORTEN_AUTOSCALE_S},
    "move-off-draining-nodes": {"task": "fleet.tasks.move_off_draining_nodes", "schedule": PORTEN_AUTOSCALE_S},
    "persist-usage": {"task": "porten.tasks.persist_usage", "schedule": PORTEN_USAGE_PERSIST_S},
    "requeue-lost-loads": {"task": "fleet.tasks.requeue_lost_loads", "schedule": PORTEN_IDLE_SWEEP_S},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "porten": {"handlers": ["console"], "level": env_str("PORTEN_LOG_LEVEL", "INFO"), "propagate": False},
        "fleet": {"handlers": ["console"], "level": env_str("PORTEN_LOG_LEVEL", "INFO"), "propagate": False},
        "catalog": {"handlers": ["console"], "level": env_str("PORTEN_LOG_LEVEL", "INFO"), "propagate": False},
        # httpx logs every health check of a starting engine at INFO.
        "httpx": {"level": "WARNING"},
        # Celery logs each task received and done at INFO: beat's sweeps come every second or two.
        "celery.app.trace": {"level": "WARNING"},
        "celery.worker.strategy": {"level": "WARNING"},
    },
}
