"""OpenAI-shaped errors: {"error": {"message", "type", "code", "param"}} everywhere."""
from __future__ import annotations

from typing import Any

from django.http import JsonResponse


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


def unauthorized(message: str = "Missing, invalid, revoked or expired API key. Send 'Authorization: Bearer <key>'.") -> JsonResponse:
    return error_response(401, message, type="invalid_request_error", code="invalid_api_key")


def model_not_found(model_id: str) -> JsonResponse:
    return error_response(
        404, f"The model '{model_id}' does not exist or is not offered.",
        type="invalid_request_error", code="model_not_found", param="model",
    )


def invalid_request(message: str, *, param: str | None = None, status: int = 400, code: str | None = None) -> JsonResponse:
    return error_response(status, message, type="invalid_request_error", code=code, param=param)


def csrf_failure_view(request, reason: str = ""):
    """Django's CSRF_FAILURE_VIEW: the OpenAI shape for the APIs, Django's own page elsewhere."""
    if request.path.startswith(("/api/", "/v1/", "/public/")):
        return error_response(403, "CSRF check failed for a signed-in session; send the X-CSRFToken header, "
                                   "or use an API key.", type="invalid_request_error", code="csrf_failed")
    from django.views.csrf import csrf_failure

    return csrf_failure(request, reason=reason)
