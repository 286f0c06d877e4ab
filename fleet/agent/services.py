"""The node agent's writes: registering this node and its heartbeats, loading and unloading the
instances placed on it, and reconciling and supervising its engines."""
from __future__ import annotations

import errno
import logging
import os
import socket
import time
from pathlib import Path

import psutil
from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from catalog.models import CatalogModel
from fleet.dispatch import instance_enqueue_load
from fleet.live import fleet_changed, inflight_count, instance_publish
from fleet.metrics import DOWNLOAD_SECONDS, DOWNLOADED_BYTES, ENGINE_LOAD_SECONDS, LOADS, metric_count, metric_observe
from fleet.models import RESIDENT_PHASES, Instance, Node, Phase
from porten.units import mb_from_bytes

from .engines import engine_for
from .engines.base import Engine, EngineLaunch
from .engines.process import (
    EngineStartError, find_engine_processes, free_port, is_alive, is_healthy, log_tail, start_engine, stop_engine,
    wait_until_healthy,
)
from .nvml import gpu_reader
from .store import ModelStore, StoreError, WeightsSource

logger = logging.getLogger(__name__)


class LoadAborted(Exception):
    """The instance was asked to unload (or was failed) while it was still loading."""


def node_engine(name: str) -> Engine:
    """The catalog engine `name` as this node runs it (its binaries and slots)."""
    return engine_for(name, llama_server_bin=settings.PORTEN_LLAMA_SERVER_BIN or None, vllm_bin=settings.PORTEN_VLLM_BIN,
                      llama_server_parallel=settings.PORTEN_LLAMA_SERVER_PARALLEL)


def model_store() -> ModelStore:
    return ModelStore(settings.PORTEN_MODEL_DIR, node=settings.PORTEN_NODE_NAME,
                      backoff_max_s=settings.PORTEN_DOWNLOAD_BACKOFF_MAX_S)


def weights_source(model: CatalogModel) -> WeightsSource:
    return WeightsSource(
        model_id=model.model_id, weight_format=model.weight_format, hf_repo=model.hf_repo,
        hf_revision=model.hf_revision or "main", hf_files=tuple(model.hf_files or ()), local_path=model.local_path,
    )


# --- nodes ------------------------------------------------------------------------------------

def cpu_memory_budget_mb() -> int:
    if settings.PORTEN_NODE_MEMORY_MB > 0:
        return settings.PORTEN_NODE_MEMORY_MB
    # Without a GPU the engines share the machine with everything else: offer half of it.
    return mb_from_bytes(psutil.virtual_memory().total) // 2


def node_devices(*, node: Node | None = None) -> tuple[bool, list[dict]]:
    """This machine's devices: GPUs from NVML, else one CPU pseudo-device with a memory budget."""
    readings = gpu_reader().read()
    if readings:
        return True, [{"index": g.index, "name": g.name, "total_mb": g.total_mb, "free_mb": g.free_mb} for g in readings]
    budget = cpu_memory_budget_mb()
    used = 0
    if node is not None and node.pk:
        used = node.instances.filter(phase__in=RESIDENT_PHASES).aggregate(total=Sum("vram_mb"))["total"] or 0
    return False, [{"index": 0, "name": "cpu", "total_mb": budget, "free_mb": max(0, budget - used)}]


class NodeNameTaken(Exception):
    """Another agent is online under this node's name."""


def node_name_taken(*, name: str) -> str | None:
    """Why this process may not be the agent of node `name` (another agent serves it), else None.
    An agent that stopped sending heartbeats, or whose process on this machine is gone, is replaced."""
    node = Node.objects.filter(name=name).first()
    if node is None or not node.online or node.agent_pid in (None, os.getpid()):
        return None
    here = socket.gethostname()
    if node.hostname == here and not is_alive(node.agent_pid):
        return None
    age_s = (timezone.now() - node.last_heartbeat_at).total_seconds()
    return (f"node {name} is already online: its agent (pid {node.agent_pid} on {node.hostname or 'an unknown host'}, "
            f"address {node.address}) sent a heartbeat {age_s:.0f} s ago. Stop that agent first, or give this "
            f"one another PORTEN_NODE_NAME.")


@transaction.atomic
def node_register(*, name: str) -> Node:
    """This process becomes the agent of node `name`; raises NodeNameTaken if another one is online."""
    node, _ = Node.objects.select_for_update().get_or_create(name=name)
    if (taken := node_name_taken(name=name)) is not None:
        raise NodeNameTaken(taken)
    node.agent_pid = os.getpid()
    node.has_gpu, node.gpus = node_devices(node=node)
    store = model_store()
    node.hostname = socket.gethostname()
    node.address = settings.PORTEN_NODE_ADDRESS
    node.model_dir = str(store.root)
    node.disk_free_mb = store.disk_free_mb()
    node.models_on_disk = store.models_on_disk()
    node.agent_started_at = node.last_heartbeat_at = timezone.now()
    node.save()
    return node


def node_heartbeat(*, name: str) -> Node:
    node = Node.objects.get(name=name)
    has_gpu, gpus = node_devices(node=node)
    store = model_store()
    engines = [{"instance": i, "pid": pid} for i, pid in sorted(find_engine_processes(name).items())]
    Node.objects.filter(pk=node.pk).update(
        has_gpu=has_gpu, gpus=gpus, disk_free_mb=store.disk_free_mb(), models_on_disk=store.models_on_disk(),
        engines=engines, last_heartbeat_at=timezone.now(),
    )
    node.refresh_from_db()
    fleet_changed()
    return node


def _set(instance: Instance, **fields) -> None:
    """Write fields to the row and the object, then publish the new state."""
    for name, value in fields.items():
        setattr(instance, name, value)
    Instance.objects.filter(pk=instance.pk).update(**fields, updated_at=timezone.now())
    instance_publish(instance, rate_bps=fields.get("download_rate_bps", 0.0))


# --- loading (runs on the node) ---------------------------------------------------------------

def instance_claim(*, instance_id: int, from_phase: str, to_phase: str, **fields) -> bool:
    """Move the row from one phase to the next with a conditional UPDATE; False means someone else did."""
    return bool(
        Instance.objects.filter(pk=instance_id, phase=from_phase).update(phase=to_phase, updated_at=timezone.now(), **fields)
    )


def _still(instance: Instance, phase: str) -> None:
    current = Instance.objects.filter(pk=instance.pk).values_list("phase", flat=True).first()
    if current != phase:
        raise LoadAborted(f"instance {instance.pk} moved to {current} while {phase}")


def instance_load(*, instance_id: int) -> str:
    """queued → downloading → loading → ready, or failed with a reason. Idempotent: a redelivered or
    repeated call finds the row already claimed and does nothing."""
    if not instance_claim(instance_id=instance_id, from_phase=Phase.QUEUED, to_phase=Phase.DOWNLOADING,
                          started_at=timezone.now(), last_error=""):
        return "not-claimed"
    instance = Instance.objects.select_related("model", "node").get(pk=instance_id)
    instance_publish(instance)
    try:
        stored = _download(instance)
        _start_engine(instance, stored.path)
    except LoadAborted as exc:
        logger.info("load of %s stopped: %s", instance, exc)
        _finish_abort(instance)
        return _load_ended(instance, "aborted")
    except (StoreError, EngineStartError) as exc:
        instance_fail(instance=instance, reason=str(exc))
        return _load_ended(instance, "failed")
    except Exception as exc:
        logger.exception("load of %s failed", instance)
        instance_fail(instance=instance, reason=f"{type(exc).__name__}: {exc}")
        return _load_ended(instance, "failed")
    return _load_ended(instance, "ready")


def _load_ended(instance: Instance, outcome: str) -> str:
    metric_count(LOADS, instance.model.model_id, instance.node.name, outcome)
    return outcome


def _download(instance: Instance):
    store = model_store()
    source = weights_source(instance.model)
    already = store.complete(source) is not None
    started = time.monotonic()
    last = {"redis": 0.0, "db": 0.0}

    def on_progress(done: int, total: int) -> None:
        now = time.monotonic()
        elapsed = max(now - started, 1e-6)
        rate = 0.0 if already else done / elapsed
        instance.bytes_done, instance.bytes_total = done, total
        final = done >= total
        if final or now - last["db"] >= 1.0:
            last["db"] = now
            _still(instance, Phase.DOWNLOADING)
            Instance.objects.filter(pk=instance.pk).update(
                bytes_done=done, bytes_total=total, download_rate_bps=rate, updated_at=timezone.now())
        if final or now - last["redis"] >= settings.PORTEN_PROGRESS_INTERVAL_S:
            last["redis"] = now
            instance_publish(instance, rate_bps=rate)

    stored = store.fetch(source, on_progress=on_progress)
    # The last progress event already told everyone; this only records the outcome.
    instance.downloaded, instance.download_seconds = not already, round(time.monotonic() - started, 3)
    Instance.objects.filter(pk=instance.pk).update(
        bytes_done=stored.bytes_total, bytes_total=stored.bytes_total, downloaded=instance.downloaded,
        download_seconds=instance.download_seconds, updated_at=timezone.now())
    if instance.downloaded:
        metric_count(DOWNLOADED_BYTES, instance.model.model_id, instance.node.name, amount=stored.bytes_total)
        metric_observe(DOWNLOAD_SECONDS, instance.download_seconds, instance.model.model_id)
    return stored


def _wait_for_victims(instance: Instance) -> None:
    """An instance placed by evicting others starts its engine once their memory is free; its
    download already overlapped with their drain."""
    if not instance.waits_for:
        return
    deadline = time.monotonic() + settings.PORTEN_DRAIN_DEADLINE_S + 120
    while Instance.objects.filter(pk__in=instance.waits_for, phase__in=RESIDENT_PHASES).exists():
        _still(instance, Phase.DOWNLOADING)
        if time.monotonic() > deadline:
            raise EngineStartError(f"memory did not free up: instances {instance.waits_for} are still unloading")
        time.sleep(0.2)


def _start_engine(instance: Instance, model_path: str) -> None:
    _wait_for_victims(instance)
    if not instance_claim(instance_id=instance.pk, from_phase=Phase.DOWNLOADING, to_phase=Phase.LOADING):
        raise LoadAborted("asked to stop before the engine started")
    instance.phase = Phase.LOADING
    model, node = instance.model, instance.node
    engine = node_engine(model.engine)
    gpu = next((g for g in node.gpus if g.get("index") in instance.gpu_indices), {})
    launch = EngineLaunch(
        instance_id=instance.pk, node_name=node.name, served_model_name=model.model_id, model_path=Path(model_path),
        context_length=model.context_length, port=_engine_port(), host=settings.PORTEN_ENGINE_BIND,
        chat_format=model.chat_format, embeddings=model.supports_embeddings, extra_args=tuple(model.serving_args),
        vram_mb=model.vram_mb, gpu_indices=tuple(instance.gpu_indices) if node.has_gpu else (),
        gpu_total_mb=int(gpu.get("total_mb", 0)),
    )
    log_path = settings.PORTEN_ENGINE_LOG_DIR / f"{model.model_id}-{instance.pk}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = start_engine(engine, launch, log_path=log_path)
    _set(instance, pid=proc.pid, port=proc.port, log_path=str(log_path), slots=engine.slots(launch))

    def should_abort() -> bool:
        return Instance.objects.filter(pk=instance.pk).values_list("phase", flat=True).first() != Phase.LOADING

    try:
        load_s = wait_until_healthy(engine, launch, proc, timeout_s=settings.PORTEN_ENGINE_LOAD_TIMEOUT_S,
                                    should_abort=should_abort)
    except EngineStartError:
        stop_engine(proc.pid)
        if should_abort():
            raise LoadAborted("asked to stop while the engine was starting")
        raise
    if not instance_claim(instance_id=instance.pk, from_phase=Phase.LOADING, to_phase=Phase.READY,
                          ready_at=timezone.now(), load_seconds=round(load_s, 3)):
        stop_engine(proc.pid)
        raise LoadAborted("asked to stop just as the engine became healthy")
    instance.phase, instance.load_seconds = Phase.READY, round(load_s, 3)
    instance_publish(instance)
    metric_observe(ENGINE_LOAD_SECONDS, load_s, model.model_id)
    logger.info("%s ready on %s port %s after %.1f s", model.model_id, node.name, proc.port, load_s)


def _engine_port() -> int:
    """A free port on the engine bind address, within PORTEN_ENGINE_PORTS when set."""
    bind, ports = settings.PORTEN_ENGINE_BIND, settings.PORTEN_ENGINE_PORTS
    first, _, last = ports.partition("-")
    candidates = range(int(first), int(last or first) + 1) if ports else [0]
    error: OSError | None = None
    for port in candidates:
        try:
            return free_port(bind, port)
        except OSError as exc:
            error = exc
            if exc.errno == errno.EADDRNOTAVAIL:
                break
    if error is not None and error.errno == errno.EADDRNOTAVAIL:
        raise EngineStartError(
            f"engines cannot listen on {bind} on this node ({error.strerror}): "
            "PORTEN_ENGINE_BIND (default PORTEN_NODE_ADDRESS) must be an address of this machine") from error
    raise EngineStartError(f"no free port for an engine on {bind} in PORTEN_ENGINE_PORTS={ports}") from error


def _finish_abort(instance: Instance) -> None:
    instance.refresh_from_db()
    if instance.pid and is_alive(instance.pid):
        stop_engine(instance.pid)
    if instance.phase in (Phase.UNLOADING, Phase.DOWNLOADING, Phase.LOADING):
        _set(instance, phase=Phase.STOPPED, stopped_at=timezone.now())


def instance_fail(*, instance: Instance, reason: str, grace_s: float = 10.0) -> None:
    if instance.pid and is_alive(instance.pid):
        stop_engine(instance.pid, grace_s=grace_s)
    _set(instance, phase=Phase.FAILED, last_error=reason[-4000:], stopped_at=timezone.now())
    logger.warning("%s failed: %s", instance, reason.splitlines()[0] if reason else "")


# --- unloading --------------------------------------------------------------------------------

def _drain(instance_id: int) -> None:
    """Let requests already on a draining instance finish, up to the drain deadline."""
    deadline = time.monotonic() + settings.PORTEN_DRAIN_DEADLINE_S
    while inflight_count(instance_id) > 0 and time.monotonic() < deadline:
        if not Instance.objects.filter(pk=instance_id, phase=Phase.DRAINING).exists():
            return
        time.sleep(0.1)


def instance_unload(*, instance_id: int) -> str:
    """Stop the engine, keep the weights. A draining instance first finishes its requests; a load
    still in progress notices and stops itself."""
    if Instance.objects.filter(pk=instance_id, phase=Phase.DRAINING).exists():
        _drain(instance_id)
    updated = Instance.objects.filter(
        pk=instance_id, phase__in=[Phase.QUEUED, Phase.DOWNLOADING, Phase.LOADING, Phase.READY, Phase.DRAINING],
    ).update(phase=Phase.UNLOADING, updated_at=timezone.now())
    if not updated:
        return "not-claimed"
    instance = Instance.objects.select_related("model", "node").get(pk=instance_id)
    instance_publish(instance)
    if instance.pid:
        stop_engine(instance.pid)
    if instance.bytes_done == 0 or instance.pid or instance.ready_at:
        # Nothing in flight (or the engine is already stopped): done here. A download in flight
        # finishes the move to stopped itself when it notices the phase change.
        _set(instance, phase=Phase.STOPPED, stopped_at=timezone.now())
    return "stopped"


# --- the node agent's housekeeping ------------------------------------------------------------

def node_reconcile(*, node_name: str) -> dict:
    """On agent start: adopt healthy tracked engines, stop untracked ones, and requeue loads a crash
    interrupted (finished files are not fetched again)."""
    node = node_register(name=node_name)
    tracked = {
        i.pk: i for i in Instance.objects.filter(node=node, phase__in=[Phase.READY, Phase.DRAINING]).select_related("model")
    }
    adopted, reaped = [], []
    for instance_id, pid in find_engine_processes(node_name).items():
        instance = tracked.get(instance_id)
        if instance is not None and instance.pid == pid:
            adopted.append(instance_id)
        else:
            stop_engine(pid)
            reaped.append(instance_id)
    for instance in tracked.values():
        if instance.pk not in adopted:
            instance_fail(instance=instance, reason="the engine was gone when the node agent restarted")
    interrupted = list(Instance.objects.filter(
        node=node, phase__in=[Phase.QUEUED, Phase.DOWNLOADING, Phase.LOADING]).select_related("model", "node"))
    for instance in interrupted:
        # Nothing of this node runs yet, so these loads were cut off: start them again.
        Instance.objects.filter(pk=instance.pk).update(phase=Phase.QUEUED, pid=None, port=None, updated_at=timezone.now())
        instance.phase = Phase.QUEUED
        instance_publish(instance)
        instance_enqueue_load(instance)
    for instance in Instance.objects.filter(node=node, phase=Phase.UNLOADING).select_related("model", "node"):
        _set(instance, phase=Phase.STOPPED, stopped_at=timezone.now())
    return {"adopted": adopted, "reaped": reaped, "requeued": [i.pk for i in interrupted]}


_unanswered_since: dict[int, float] = {}  # instance -> when its engine first missed a liveness check


def node_supervise(*, node_name: str) -> list[int]:
    """Fail instances whose engine died (with the tail of its log), or that answered no liveness
    check over HTTP for PORTEN_LIVENESS_S (hung or stopped: it is killed)."""
    failed = []
    supervised = set()
    for instance in Instance.objects.filter(
        node__name=node_name, phase__in=[Phase.READY, Phase.DRAINING], pid__isnull=False,
    ).select_related("model", "node"):
        supervised.add(instance.pk)
        if not is_alive(instance.pid):
            tail = log_tail(Path(instance.log_path)) if instance.log_path else ""
            instance_fail(instance=instance, reason=f"the engine (pid {instance.pid}) exited unexpectedly\n{tail}")
            failed.append(instance.pk)
            continue
        engine = node_engine(instance.model.engine)
        if is_healthy(engine.liveness_url(settings.PORTEN_ENGINE_BIND, instance.port), timeout_s=2.0):
            _unanswered_since.pop(instance.pk, None)
            continue
        since = _unanswered_since.setdefault(instance.pk, time.monotonic())
        if time.monotonic() - since >= settings.PORTEN_LIVENESS_S:
            _unanswered_since.pop(instance.pk, None)
            instance_fail(instance=instance, reason=f"the engine (pid {instance.pid}) stopped answering: no answer "
                                                    f"to its liveness check for {settings.PORTEN_LIVENESS_S:g} s",
                          grace_s=0.0)  # a hung engine would not act on SIGTERM
            failed.append(instance.pk)
    for gone in set(_unanswered_since) - supervised:
        del _unanswered_since[gone]
    return failed
