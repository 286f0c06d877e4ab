"""GET /healthz: is the database reachable, is Redis reachable."""
from __future__ import annotations

import time

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import JsonResponse

from .redis import aredis_client


def _check_database() -> dict:
    started = time.perf_counter()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any failure is the answer we report, not a crash
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        connection.close()
    return {"ok": True, "vendor": connection.vendor, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


async def _check_redis() -> dict:
    started = time.perf_counter()
    try:
        await aredis_client().ping()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


async def healthz(request):
    database = await sync_to_async(_check_database, thread_sensitive=False)()
    redis_state = await _check_redis()
    ok = database["ok"] and redis_state["ok"]
    # 503 when degraded so a load balancer takes the hub out of rotation; the body says why.
    return JsonResponse({"status": "ok" if ok else "degraded", "database": database, "redis": redis_state},
                        status=200 if ok else 503)
