"""OpenAI-shaped errors: {"error": {"message", "type", "code", "param"}} everywhere."""
from __future__ import annotations

from typing import Any

from django.http import JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler


def error_body(message: str, *, type: str, code: str | None, param: str | None = None, **extra: Any) -> dict:
    body = {"message": message, "type": type, "code": code, "param": param}
    body.update(extra)
    return {"error": body}


def error_response(
    status: int, message: str, *, type: str, code: str | None, param: str | None = None,
    headers: dict[str, str] | None = None, **extra: Any,
) -> JsonResponse:
    response = JsonResponse(error_body(message, type=type, code=code, param=param, **extra), status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def unauthorized(message: str = "Missing or invalid API key. Send 'Authorization: Bearer <key>'.") -> JsonResponse:
    return error_response(401, message, type="invalid_request_error", code="invalid_api_key")


def model_not_found(model_id: str) -> JsonResponse:
    return error_response(
        404, f"The model '{model_id}' does not exist or is not offered.",
        type="invalid_request_error", code="model_not_found", param="model",
    )


def invalid_request(message: str, *, param: str | None = None, status: int = 400, code: str | None = None) -> JsonResponse:
    return error_response(status, message, type="invalid_request_error", code=code, param=param)


_DRF_CODES = {401: "invalid_api_key", 403: "permission_denied", 404: "not_found", 405: "method_not_allowed"}


def drf_exception_handler(exc: Exception, context: dict) -> Response | None:
    response = exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
        response.status_code = 401
        message = "Missing or invalid API key. Send 'Authorization: Bearer <key>'."
    else:
        detail = response.data.get("detail") if isinstance(response.data, dict) else None
        message = str(detail) if detail else str(response.data)
    code = getattr(exc, "porten_code", None) or _DRF_CODES.get(response.status_code, "invalid_request")
    response.data = error_body(message, type="invalid_request_error", code=code, param=getattr(exc, "param", None))
    return response
