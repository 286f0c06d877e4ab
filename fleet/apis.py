"""The fleet part of the operator API: nodes (drain, undrain) and instances (load now, unload)."""
from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, status
from rest_framework.response import Response

from catalog.models import CatalogModel
from porten.audit import audit_record
from porten.operator import Conflict, OperatorApi, query_limit

from .models import Instance, Node, Phase
from .placement import PlacementError, instance_load_now, instance_unload
from .serializers import InstanceSerializer, LoadRequestSerializer, NodeSerializer
from .services import node_set_draining


def _node(name: str) -> Node:
    node = Node.objects.prefetch_related("instances__model", "instances__node").filter(name=name).first()
    if node is None:
        raise exceptions.NotFound(f"There is no node named '{name}'.")
    return node


class NodeListApi(OperatorApi):
    serializer_class = NodeSerializer

    @extend_schema(summary="List nodes with their memory, models on disk and live instances",
                   responses=NodeSerializer(many=True))
    def get(self, request):
        nodes = Node.objects.prefetch_related("instances__model", "instances__node").order_by("name")
        return Response(NodeSerializer(nodes, many=True).data)


class NodeApi(OperatorApi):
    serializer_class = NodeSerializer

    @extend_schema(summary="One node")
    def get(self, request, name: str):
        return Response(NodeSerializer(_node(name)).data)


class NodeDrainApi(OperatorApi):
    serializer_class = NodeSerializer
    draining = True

    @extend_schema(summary="Drain a node: no new placements; its models move when next requested", request=None)
    def post(self, request, name: str):
        node_set_draining(name=_node(name).name, draining=self.draining)
        audit_record(user=request.user, action="node.drain" if self.draining else "node.undrain", target=name)
        return Response(NodeSerializer(_node(name)).data)


class NodeUndrainApi(NodeDrainApi):
    draining = False

    @extend_schema(summary="Undrain a node: it takes placements again", request=None)
    def post(self, request, name: str):
        return super().post(request, name)


PHASES = [p.value for p in Phase]


class InstanceListApi(OperatorApi):
    serializer_class = InstanceSerializer

    @extend_schema(summary="List instances, newest first", responses=InstanceSerializer(many=True), parameters=[
        OpenApiParameter("phase", str, enum=PHASES, description="Only instances in this phase."),
        OpenApiParameter("model", str, description="Only this catalog id."),
        OpenApiParameter("node", str, description="Only this node."),
        OpenApiParameter("limit", int, description="At most this many (1-1000, default 100)."),
    ])
    def get(self, request):
        instances = Instance.objects.select_related("model", "node")
        phase, model, node = (request.query_params.get(k) for k in ("phase", "model", "node"))
        if phase is not None:
            if phase not in PHASES:
                raise exceptions.ValidationError({"phase": f"One of {', '.join(PHASES)}."})
            instances = instances.filter(phase=phase)
        if model is not None:
            instances = instances.filter(model__model_id=model)
        if node is not None:
            instances = instances.filter(node__name=node)
        limit = query_limit(request)
        return Response(InstanceSerializer(instances.order_by("-created_at")[:limit], many=True).data)

    @extend_schema(summary="Load a model now, where the planner chooses or on a named node",
                   request=LoadRequestSerializer, responses={202: InstanceSerializer})
    def post(self, request):
        serializer = LoadRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        model = CatalogModel.objects.filter(model_id=serializer.validated_data["model"]).first()
        if model is None:
            raise exceptions.ValidationError({"model": f"There is no catalog entry "
                                                       f"'{serializer.validated_data['model']}'."})
        if not model.enabled:
            raise Conflict(f"'{model.model_id}' is disabled; enable it first.", code="model_disabled")
        node_name = serializer.validated_data.get("node", "")
        try:
            instance = instance_load_now(model=model, node_name=node_name)
        except PlacementError as exc:
            if exc.code == "node_not_found":
                raise exceptions.ValidationError({"node": exc.reason})
            raise Conflict(exc.reason, code=exc.code)
        audit_record(user=request.user, action="instance.load", target=model.model_id,
                     detail={"node": instance.node.name, "instance": instance.pk})
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)


def _instance(instance_id: int) -> Instance:
    instance = Instance.objects.select_related("model", "node").filter(pk=instance_id).first()
    if instance is None:
        raise exceptions.NotFound(f"There is no instance {instance_id}.")
    return instance


class InstanceApi(OperatorApi):
    serializer_class = InstanceSerializer

    @extend_schema(summary="One instance")
    def get(self, request, instance_id: int):
        return Response(InstanceSerializer(_instance(instance_id)).data)


class InstanceUnloadApi(OperatorApi):
    serializer_class = InstanceSerializer

    @extend_schema(summary="Unload an instance (a ready one finishes its requests first; weights stay on disk)",
                   request=None, responses={202: InstanceSerializer})
    def post(self, request, instance_id: int):
        instance = _instance(instance_id)
        if not instance_unload(instance=instance):
            raise Conflict(f"Instance {instance_id} is {instance.phase}: nothing to unload.", code="not_loaded")
        audit_record(user=request.user, action="instance.unload", target=instance.model.model_id,
                     detail={"node": instance.node.name, "instance": instance.pk})
        return Response(InstanceSerializer(_instance(instance_id)).data, status=status.HTTP_202_ACCEPTED)
