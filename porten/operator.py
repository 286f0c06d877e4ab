"""The operator API's permission (staff session or operator key), base view and errors."""
from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import authentication, exceptions, permissions
from rest_framework.views import APIView

from .auth import ApiKeyUser
from .drf import ApiKeyAuthentication
from .models import KeyRole


class IsOperator(permissions.BasePermission):
    """A signed-in staff user, or an API key with the operator role."""

    message = "This needs an operator: a staff session, or an API key with the operator role."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if isinstance(user, ApiKeyUser):
            return user.api_key.role == KeyRole.OPERATOR
        return bool(user is not None and user.is_authenticated and user.is_staff)


class OperatorApi(APIView):
    """Base of the operator API's views: a key or the admin's session, operators only."""

    authentication_classes = [ApiKeyAuthentication, authentication.SessionAuthentication]
    permission_classes = [IsOperator]


def django_validation_error(exc: DjangoValidationError, *, renamed: dict[str, str] | None = None
                            ) -> exceptions.ValidationError:
    """A model's own validation (full_clean) as DRF's 400, under the API's field names."""
    if not hasattr(exc, "error_dict"):
        return exceptions.ValidationError({"detail": exc.messages})
    return exceptions.ValidationError({(renamed or {}).get(field, field): messages
                                       for field, messages in exc.message_dict.items()})


class Conflict(exceptions.APIException):
    status_code = 409
    default_detail = "The request conflicts with the current state."
    default_code = "conflict"

    def __init__(self, detail: str, *, code: str = "conflict") -> None:
        super().__init__(detail)
        self.porten_code = code


def query_limit(request, *, default: int = 100, most: int = 1000) -> int:
    """The `limit` query parameter: a whole number from 1 to `most`, else DRF's 400 naming it."""
    try:
        limit = int(request.query_params.get("limit", default))
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise exceptions.ValidationError({"limit": f"A whole number from 1 to {most}."})
    return limit
