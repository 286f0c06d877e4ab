"""DRF's exception handler, answering in the OpenAI error shape (porten.errors)."""
from __future__ import annotations

from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler

from .errors import error_body

_DRF_CODES = {401: "invalid_api_key", 403: "permission_denied", 404: "not_found", 405: "method_not_allowed",
              429: "rate_limit_exceeded"}


def drf_exception_handler(exc: Exception, context: dict) -> Response | None:
    response = exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
        response.status_code = 401
        message = "Missing or invalid API key. Send 'Authorization: Bearer <key>'."
    elif isinstance(exc, drf_exceptions.ValidationError):
        param, message = _first_problem(response.data)
        code = getattr(exc, "porten_code", None) or "invalid_value"
        response.data = error_body(message, type="invalid_request_error", code=code, param=param,
                                   fields=response.data if isinstance(response.data, dict) else None)
        return response
    else:
        detail = response.data.get("detail") if isinstance(response.data, dict) else None
        message = str(detail) if detail else str(response.data)
    code = getattr(exc, "porten_code", None) or _DRF_CODES.get(response.status_code, "invalid_request")
    response.data = error_body(message, type="invalid_request_error", code=code, param=getattr(exc, "param", None))
    return response


def _first_problem(data, path: str = "") -> tuple[str | None, str]:
    """(field, message) of the first problem in DRF's nested validation errors."""
    if isinstance(data, dict) and data:
        key, value = next(iter(data.items()))
        field = key if key not in ("non_field_errors", "detail") else ""
        return _first_problem(value, f"{path}.{field}" if path and field else (path or field))
    if isinstance(data, list) and data:
        return _first_problem(data[0], path)
    return (path or None), (f"{path}: {data}" if path else str(data))
