"""GET /v1/models and /v1/models/{id}; the catalog part of the operator API (/api/catalog/)."""
from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.selectors import ready_model_ids
from porten.audit import audit_record
from porten.auth import ApiKeyUser
from porten.scopes import user_scope
from porten.drf import ApiKeyAuthentication
from porten.operator import Conflict, OperatorApi, django_validation_error

from .models import CatalogModel
from .selectors import offered_model, offered_models
from .serializers import CatalogEntrySerializer, ModelObjectSerializer
from .services import (
    ModelInUse, catalog_model_create, catalog_model_delete, catalog_model_update, catalog_models_set_enabled,
    catalog_models_set_pinned,
)


class ModelNotFound(exceptions.NotFound):
    porten_code = "model_not_found"
    param = "model"


def _scope(user):
    """What the caller may use (None: everything)."""
    if isinstance(user, ApiKeyUser):
        return user.scope
    return None if user.is_staff else user_scope(user)


class ModelListSerializer(serializers.Serializer):
    object = serializers.CharField(default="list")
    data = ModelObjectSerializer(many=True)


class ModelListApi(APIView):
    authentication_classes = [ApiKeyAuthentication, SessionAuthentication]

    @extend_schema(operation_id="v1_models_list", tags=["v1"], summary="The offered models (OpenAI list format, with Porten's fields)",
                   responses=ModelListSerializer)
    def get(self, request):
        scope = _scope(request.user)
        models = [m for m in offered_models() if scope is None or scope.allows(m.model_id)]
        data = ModelObjectSerializer(models, many=True, context={"ready_ids": ready_model_ids()}).data
        return Response({"object": "list", "data": data})


class ModelDetailApi(APIView):
    authentication_classes = [ApiKeyAuthentication, SessionAuthentication]

    @extend_schema(operation_id="v1_model", tags=["v1"], summary="One offered model, by id or alias", responses=ModelObjectSerializer)
    def get(self, request, model_id: str):
        model = offered_model(model_id)
        scope = _scope(request.user)
        if model is None or (scope is not None and not scope.allows(model.model_id)):
            raise ModelNotFound(f"The model '{model_id}' does not exist or is not offered.")
        return Response(ModelObjectSerializer(model, context={"ready_ids": ready_model_ids()}).data)


# --- the operator API -------------------------------------------------------------------------

class CatalogEntryNotFound(exceptions.NotFound):
    porten_code = "model_not_found"


def _entry(model_id: str) -> CatalogModel:
    model = CatalogModel.objects.filter(model_id=model_id).first()
    if model is None:
        raise CatalogEntryNotFound(f"There is no catalog entry '{model_id}'.")
    return model


class CatalogApi(OperatorApi):
    serializer_class = CatalogEntrySerializer

    @extend_schema(summary="List the catalog (enabled and disabled entries)", responses=CatalogEntrySerializer(many=True))
    def get(self, request):
        return Response(CatalogEntrySerializer(CatalogModel.objects.order_by("model_id"), many=True).data)

    @extend_schema(summary="Add a catalog entry", request=CatalogEntrySerializer, responses={201: CatalogEntrySerializer})
    def post(self, request):
        serializer = CatalogEntrySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            model = catalog_model_create(**serializer.validated_data)
        except DjangoValidationError as exc:
            raise django_validation_error(exc, renamed={"model_id": "id"})
        audit_record(user=request.user, action="catalog.create", target=model.model_id, detail=request.data)
        return Response(CatalogEntrySerializer(model).data, status=status.HTTP_201_CREATED)


class CatalogEntryApi(OperatorApi):
    serializer_class = CatalogEntrySerializer

    @extend_schema(summary="One catalog entry")
    def get(self, request, model_id: str):
        return Response(CatalogEntrySerializer(_entry(model_id)).data)

    @extend_schema(summary="Change a catalog entry (the fields given)", request=CatalogEntrySerializer)
    def patch(self, request, model_id: str):
        model = _entry(model_id)
        serializer = CatalogEntrySerializer(model, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        try:
            model = catalog_model_update(model=model, **serializer.validated_data)
        except DjangoValidationError as exc:
            raise django_validation_error(exc, renamed={"model_id": "id"})
        audit_record(user=request.user, action="catalog.update", target=model.model_id, detail=request.data)
        return Response(CatalogEntrySerializer(model).data)

    @extend_schema(summary="Delete a catalog entry (refused while it has live instances)", responses={204: None})
    def delete(self, request, model_id: str):
        model = _entry(model_id)
        try:
            catalog_model_delete(model=model)
        except ModelInUse as exc:
            raise Conflict(str(exc), code="model_in_use")
        audit_record(user=request.user, action="catalog.delete", target=model_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


CATALOG_ACTIONS = {
    "enable": lambda model: catalog_models_set_enabled(ids=[model.pk], enabled=True),
    "disable": lambda model: catalog_models_set_enabled(ids=[model.pk], enabled=False),
    "pin": lambda model: catalog_models_set_pinned(ids=[model.pk], pinned=True),
    "unpin": lambda model: catalog_models_set_pinned(ids=[model.pk], pinned=False),
}


class CatalogEntryActionApi(OperatorApi):
    serializer_class = CatalogEntrySerializer

    @extend_schema(operation_id="api_catalog_action", summary="Enable, disable, pin or unpin an entry", request=None, parameters=[
        OpenApiParameter("action", str, OpenApiParameter.PATH, enum=list(CATALOG_ACTIONS))])
    def post(self, request, model_id: str, action: str):
        model = _entry(model_id)
        if action not in CATALOG_ACTIONS:
            raise exceptions.NotFound(f"No action '{action}'; one of {', '.join(CATALOG_ACTIONS)}.")
        CATALOG_ACTIONS[action](model)
        audit_record(user=request.user, action=f"catalog.{action}", target=model.model_id)
        model.refresh_from_db()
        return Response(CatalogEntrySerializer(model).data)
