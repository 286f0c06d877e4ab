"""Fleet metrics: rare events that node agents and the planner count in Redis, and the collector that
turns them and the fleet's rows into Prometheus samples at scrape time (fleet-wide, whichever hub
process answers the scrape)."""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from django.db.models import Count
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from catalog.models import CatalogModel
from porten.redis import redis_client

from .demand import demand_counts, demand_recent
from .models import RESIDENT_PHASES, Instance, Node

logger = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass(frozen=True)
class FleetMetric:
    """A counter (no buckets) or histogram (buckets) kept in the Redis hash `porten:metrics:<name>`:
    one field per label set (a JSON list of the label values), and for a histogram one per label set
    and bucket (the bucket's upper bound last, "+Inf" past the last one) plus its sum ("sum" last).
    Buckets are stored per bucket, not cumulative: one HINCRBY per observation."""

    name: str
    documentation: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        return f"porten:metrics:{self.name}"


LOADS = FleetMetric("porten_loads", "Loads (cold starts) that ended, by outcome: ready, failed or aborted.",
                    ("model", "node", "outcome"))
DOWNLOADED_BYTES = FleetMetric("porten_download_bytes", "Bytes of weights fetched by loads that downloaded them.",
                               ("model", "node"))
DOWNLOAD_SECONDS = FleetMetric(
    "porten_download_seconds", "Time a load spent fetching weights that were not on the node yet.", ("model",),
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600))
ENGINE_LOAD_SECONDS = FleetMetric(
    "porten_engine_load_seconds", "Engine start to healthy, per load that got there.", ("model",),
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
EVICTIONS = FleetMetric(
    "porten_evictions", "Ready instances sent to unload, by reason: room (for another model), idle (no request "
                        "for its idle window), scale_in (a replica not needed), drain (its node is draining), "
                        "operator (asked for).",
    ("model", "reason"))

FLEET_METRICS = (LOADS, DOWNLOADED_BYTES, DOWNLOAD_SECONDS, ENGINE_LOAD_SECONDS, EVICTIONS)

class _Outage:
    """A Redis outage is logged at its first failure, not at every event or scrape during it."""

    def __init__(self, message: str) -> None:
        self.message, self.failing = message, False

    def failed(self) -> None:
        if not self.failing:
            logger.warning(self.message, exc_info=True)
        self.failing = True

    def passed(self) -> None:
        self.failing = False


_writes = _Outage("fleet metrics are not being recorded: Redis did not take them")
_reads = _Outage("/metrics: the fleet events in Redis could not be read")


def _field(labelvalues: tuple[str, ...], part: str | None = None) -> str:
    return json.dumps([*labelvalues, part] if part is not None else list(labelvalues))


def _bucket(metric: FleetMetric, value: float) -> str:
    return next((repr(float(b)) for b in metric.buckets if value <= b), "+Inf")


def _write(commands) -> None:
    """Run `commands(pipe)` on one pipeline. Best effort: a metric is never worth a failed load."""
    try:
        pipe = redis_client().pipeline(transaction=False)
        commands(pipe)
        pipe.execute()
    except Exception:
        _writes.failed()
    else:
        _writes.passed()


def metric_count(metric: FleetMetric, *labelvalues: str, amount: int = 1) -> None:
    """Add `amount` to a counter, fleet-wide."""
    _write(lambda pipe: pipe.hincrby(metric.key, _field(tuple(map(str, labelvalues))), int(amount)))


def metric_observe(metric: FleetMetric, value: float, *labelvalues: str) -> None:
    """One observation of a histogram, fleet-wide."""
    labels = tuple(map(str, labelvalues))

    def commands(pipe) -> None:
        pipe.hincrby(metric.key, _field(labels, _bucket(metric, value)), 1)
        pipe.hincrbyfloat(metric.key, _field(labels, "sum"), float(value))

    _write(commands)


def _counter_family(metric: FleetMetric, fields: dict[str, str]) -> Metric:
    family = CounterMetricFamily(metric.name, metric.documentation, labels=metric.labels)
    for field, value in sorted(fields.items()):
        family.add_metric(json.loads(field), float(value))
    return family


def _histogram_family(metric: FleetMetric, fields: dict[str, str]) -> Metric:
    family = HistogramMetricFamily(metric.name, metric.documentation, labels=metric.labels)
    per_labels: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
    for field, value in fields.items():
        *labels, part = json.loads(field)
        per_labels[tuple(labels)][part] = float(value)
    bounds = [repr(float(b)) for b in metric.buckets] + ["+Inf"]
    for labels, parts in sorted(per_labels.items()):
        cumulative, buckets = 0.0, []
        for bound in bounds:
            cumulative += parts.get(bound, 0.0)
            buckets.append((bound, cumulative))
        family.add_metric(list(labels), buckets, parts.get("sum", 0.0))
    return family


class FleetCollector:
    """Samples read at scrape time: the Redis-counted fleet events, instances by phase, nodes'
    memory and liveness, and demand per model. A source that does not answer is left out (and
    `porten_metrics_source_up` says which), so a scrape never fails for it."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("porten_metrics_source_up", "Whether this scrape could read the source.",
                               labels=("source",))
        try:
            families = list(self._from_redis())
        except Exception:
            _reads.failed()
            families, redis_ok = [], False
        else:
            _reads.passed()
            redis_ok = True
        try:
            families += list(self._from_database(redis_ok=redis_ok))
        except Exception:
            logger.warning("/metrics: the fleet's rows could not be read", exc_info=True)
            database_ok = False
        else:
            database_ok = True
        up.add_metric(["redis"], float(redis_ok))
        up.add_metric(["database"], float(database_ok))
        yield from families
        yield up

    def _from_redis(self) -> Iterator[Metric]:
        pipe = redis_client().pipeline(transaction=False)
        for metric in FLEET_METRICS:
            pipe.hgetall(metric.key)
        for metric, fields in zip(FLEET_METRICS, pipe.execute()):
            yield _histogram_family(metric, fields) if metric.buckets else _counter_family(metric, fields)

    def _from_database(self, *, redis_ok: bool) -> Iterator[Metric]:
        instances = GaugeMetricFamily("porten_instances", "Instances holding memory on a node, by phase.",
                                      labels=("model", "node", "phase"))
        for model_id, node, phase, count in Instance.objects.filter(phase__in=RESIDENT_PHASES).values_list(
                "model__model_id", "node__name", "phase").annotate(count=Count("id")).order_by(
                "model__model_id", "node__name", "phase"):
            instances.add_metric([model_id, node, phase], count)
        yield instances

        node_up = GaugeMetricFamily("porten_node_up", "1 while the node sends heartbeats.", labels=("node",))
        draining = GaugeMetricFamily("porten_node_draining", "1 while the node takes no new placements.",
                                     labels=("node",))
        labels = ("node", "device", "device_name")
        free = GaugeMetricFamily("porten_node_memory_free_bytes", "Free memory per GPU (a CPU node: its memory "
                                 "budget less what is resident) at the node's last heartbeat; online nodes only.",
                                 labels=labels)
        total = GaugeMetricFamily("porten_node_memory_total_bytes", "Memory per GPU (a CPU node: its budget); "
                                  "online nodes only.", labels=labels)
        for node in Node.objects.all():
            online = node.online
            node_up.add_metric([node.name], float(online))
            draining.add_metric([node.name], float(node.draining))
            if not online:
                continue  # an old reading would pass for free memory that nobody can place into
            for device in node.gpus:
                device_labels = [node.name, str(device.get("index", "")), str(device.get("name", ""))]
                free.add_metric(device_labels, int(device.get("free_mb", 0)) * MB)
                total.add_metric(device_labels, int(device.get("total_mb", 0)) * MB)
        yield from (node_up, draining, free, total)

        if not redis_ok:
            return
        model_ids = list(CatalogModel.objects.filter(enabled=True).order_by("model_id").values_list(
            "model_id", flat=True))
        counts = GaugeMetricFamily("porten_model_demand_requests", "Requests (served and unmet) for the model over "
                                   "the demand window.", labels=("model",))
        weighted = GaugeMetricFamily("porten_model_demand_weighted", "The demand the planner compares: requests "
                                     "over the window, each weighted by how recent it is.", labels=("model",))
        for model_id, value in demand_counts(model_ids).items():
            counts.add_metric([model_id], value)
        for model_id, value in demand_recent(model_ids).items():
            weighted.add_metric([model_id], value)
        yield counts
        yield weighted
