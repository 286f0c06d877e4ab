"""The operator API's API keys (create, list, revoke), usage and audit log."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, status
from rest_framework.response import Response

from .audit import audit_record
from .operator import OperatorApi, query_limit
from .keys import api_key_create, api_key_revoke, api_key_update
from .models import ApiKey, AuditEntry
from .serializers import (
    ApiKeyCreateSerializer, ApiKeyScopeSerializer, ApiKeySerializer, AuditEntrySerializer, NewApiKeySerializer,
)
from .usage import since_days, usage_rows, usage_totals


class ApiKeyListApi(OperatorApi):
    serializer_class = ApiKeySerializer

    @extend_schema(summary="List API keys (never the keys themselves)", responses=ApiKeySerializer(many=True))
    def get(self, request):
        return Response(ApiKeySerializer(ApiKey.objects.order_by("name", "pk"), many=True).data)

    @extend_schema(summary="Create an API key; the answer holds the key, shown this once",
                   request=ApiKeyCreateSerializer, responses={201: NewApiKeySerializer})
    def post(self, request):
        serializer = ApiKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        name = serializer.validated_data["name"].strip()
        if not name:
            raise exceptions.ValidationError({"name": "A key needs a name."})
        try:
            api_key, raw_key = api_key_create(**{**serializer.validated_data, "name": name})
        except ValueError as exc:
            raise exceptions.ValidationError({"expires_at" if "expiry" in str(exc) else "name": str(exc)})
        audit_record(user=request.user, action="key.create", target=f"{api_key.name} ({api_key.prefix}…)",
                     detail={"role": api_key.role})
        return Response({**ApiKeySerializer(api_key).data, "key": raw_key}, status=status.HTTP_201_CREATED)


def _key(key_id: int) -> ApiKey:
    api_key = ApiKey.objects.select_related("user").filter(pk=key_id).first()
    if api_key is None:
        raise exceptions.NotFound(f"There is no API key {key_id}.")
    return api_key


class ApiKeyApi(OperatorApi):
    serializer_class = ApiKeySerializer

    @extend_schema(summary="One API key (never the key itself)")
    def get(self, request, key_id: int):
        return Response(ApiKeySerializer(_key(key_id)).data)

    @extend_schema(summary="Change a key's name, role, models, expiry or limits", request=ApiKeyScopeSerializer)
    def patch(self, request, key_id: int):
        api_key = _key(key_id)
        serializer = ApiKeyScopeSerializer(api_key, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        api_key = api_key_update(api_key=api_key, **serializer.validated_data)
        audit_record(user=request.user, action="key.update", target=str(api_key), detail=request.data)
        return Response(ApiKeySerializer(api_key).data)


class ApiKeyRevokeApi(OperatorApi):
    serializer_class = ApiKeySerializer

    @extend_schema(summary="Revoke an API key (every hub process refuses it within seconds)", request=None)
    def post(self, request, key_id: int):
        api_key = _key(key_id)
        api_key_revoke(api_key=api_key)
        audit_record(user=request.user, action="key.revoke", target=f"{api_key.name} ({api_key.prefix}…)")
        return Response(ApiKeySerializer(api_key).data)


class AuditLogApi(OperatorApi):
    serializer_class = AuditEntrySerializer

    @extend_schema(summary="The latest operator writes, newest first", responses=AuditEntrySerializer(many=True),
                   parameters=[OpenApiParameter("limit", int, description="At most this many (1-1000, default 100).")])
    def get(self, request):
        limit = query_limit(request)
        return Response(AuditEntrySerializer(AuditEntry.objects.all()[:limit], many=True).data)


USAGE_GROUPS = {"model": "model_id", "key": "api_key__name", "user": "user__username", "day": "day"}


class UsageApi(OperatorApi):
    @extend_schema(summary="Tokens and requests used, summed by model, key, user and/or day", parameters=[
        OpenApiParameter("days", int, description="The last this many days (1-366, default 7)."),
        OpenApiParameter("by", str, description="Comma-separated: model, key, user, day (default model)."),
        OpenApiParameter("model", str, description="Only this model."),
    ], responses={200: {"type": "object"}})
    def get(self, request):
        try:
            days = int(request.query_params.get("days", 7))
        except ValueError:
            days = 0
        if not 1 <= days <= 366:
            raise exceptions.ValidationError({"days": "A whole number from 1 to 366."})
        groups = [g.strip() for g in request.query_params.get("by", "model").split(",") if g.strip()]
        if not groups or any(g not in USAGE_GROUPS for g in groups):
            raise exceptions.ValidationError({"by": f"Comma-separated, from: {', '.join(USAGE_GROUPS)}."})
        by = tuple(USAGE_GROUPS[g] for g in groups)
        rows = usage_totals(usage_rows(since=since_days(days), model_id=request.query_params.get("model")), by=by)
        data = [{**{g: (row[USAGE_GROUPS[g]].isoformat()[:10] if g == "day" else row[USAGE_GROUPS[g]])
                    for g in groups},
                 "requests": row["requests_sum"], "prompt_tokens": row["prompt_tokens_sum"],
                 "completion_tokens": row["completion_tokens_sum"],
                 "total_tokens": row["prompt_tokens_sum"] + row["completion_tokens_sum"]} for row in rows]
        totals = {name: sum(row[name] for row in data) for name in
                  ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
        return Response({"days": days, "by": groups, "data": data, "totals": totals})
