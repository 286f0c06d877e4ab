"""GET /v1/models and /v1/models/{id}."""
from __future__ import annotations

from rest_framework import exceptions
from rest_framework.authentication import SessionAuthentication
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.selectors import ready_model_ids
from porten.drf import ApiKeyAuthentication

from .selectors import offered_model, offered_models
from .serializers import ModelObjectSerializer


class ModelNotFound(exceptions.NotFound):
    porten_code = "model_not_found"
    param = "model"


class ModelListApi(APIView):
    authentication_classes = [ApiKeyAuthentication, SessionAuthentication]

    def get(self, request):
        data = ModelObjectSerializer(offered_models(), many=True, context={"ready_ids": ready_model_ids()}).data
        return Response({"object": "list", "data": data})


class ModelDetailApi(APIView):
    authentication_classes = [ApiKeyAuthentication, SessionAuthentication]

    def get(self, request, model_id: str):
        model = offered_model(model_id)
        if model is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist or is not offered.")
        return Response(ModelObjectSerializer(model, context={"ready_ids": ready_model_ids()}).data)
