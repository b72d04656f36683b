"""``fusionrec embed-workers``: a supervised pool of embedding worker processes.

One worker process per GPU when CUDA is present (worker ``i`` on ``cuda:i``), else
``embed_workers`` CPU processes (default 1) sharing the cores. All join one consumer group on
``catalog``, so Kafka spreads the partitions over them. The supervisor

* registers the configured model version and, when it is not the active one, re-embeds the stored
  catalog into it in a background thread and flips readers once it is complete (:mod:`fusionrec.models.backfill`);
* restarts a worker that dies (its partitions meanwhile move to the others) — up to ``max_restarts``
  within ``restart_window_s``, after which it stops the pool and raises :class:`WorkerCrashedError`
  carrying the worker's own exception and traceback;
* on SIGTERM/SIGINT asks every worker to drain and commit, then exits;
* serves one ``/metrics`` (``embed_metrics_port``) adding up its own and every worker's metrics
  (prometheus_client multi-process mode; a dead worker's live gauges are dropped).
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from fusionrec.core.errors import FusionrecError
from fusionrec.core.metrics import Metrics, enable_multiprocess, process_exited, serve_multiprocess
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.backfill import Backfill, live_versions, prepare, version_info
from fusionrec.models.embedder import CatalogEmbedder, EmbedMetrics
from fusionrec.models.encoder import ModelSpec, TextEncoder, cpu_threads
from fusionrec.models.vectors import VectorStore
from fusionrec.models.worker import EmbedWorker
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.runtime import retrying

log = logging.getLogger(__name__)


class WorkerCrashedError(FusionrecError):
    """A worker kept dying; ``str()`` holds its last exception and traceback."""


@dataclass(frozen=True)
class Slot:
    index: int
    device: str
    threads: int


def plan(settings: Settings, workers: int | None = None) -> list[Slot]:
    """Which worker runs where: one per GPU (or ``workers`` of them), else CPU workers sharing the cores."""
    gpus = torch.cuda.device_count() if settings.embed.device in ("auto", "cuda") else 0
    if settings.embed.device.startswith("cuda:"):
        return [Slot(i, settings.embed.device, 0) for i in range(workers or settings.embed.workers or 1)]
    if gpus:
        n = workers or settings.embed.workers or gpus
        return [Slot(i, f"cuda:{i % gpus}", 0) for i in range(n)]
    n = workers or settings.embed.workers or 1
    threads = settings.embed.threads or cpu_threads(n)
    return [Slot(i, "cpu", threads) for i in range(n)]


def build_embedder(settings: Settings, encoder: TextEncoder, metrics: Metrics | None, *,
                   worker: str = "") -> CatalogEmbedder:
    client = connect(settings)
    store = VectorStore(client, settings, worker=worker)
    info = version_info(encoder.spec, settings)
    return CatalogEmbedder(encoder, store, info.version, batch_size=settings.embed.batch_size,
                           metrics=metrics,
                           cache_items=settings.embed.cache_items, delete_versions=lambda: live_versions(store))


def worker_main(settings: Settings, slot: Slot, errors: Any) -> None:
    """Entry point of a worker process; reports an exception to the supervisor before dying.

    The supervisor stops a worker with SIGTERM (not a shared multiprocessing Event: a worker killed
    while waiting on one would leave it unable to notify); a worker whose supervisor vanished stops too.
    """
    logging.basicConfig(level=settings.ops.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker-{slot.index} %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    local_stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: local_stop.set())
    try:
        metrics = Metrics()  # multi-process mode (inherited): the supervisor serves the sum
        encoder = TextEncoder.from_settings(settings, device=slot.device, threads=slot.threads)
        encoder.warmup()
        name = f"{socket.gethostname()}:{mp.current_process().pid}:{slot.index}"
        embedder = build_embedder(settings, encoder, metrics, worker=name)
        log.info("worker %d on %s (%s threads, %s): model %s, version %s", slot.index, slot.device,
                 slot.threads or "-", encoder.runtime, encoder.spec.model_id, embedder.version)
        parent = os.getppid()

        def orphaned() -> None:
            while not local_stop.wait(1.0):
                if os.getppid() != parent:
                    log.warning("supervisor %d is gone: stopping", parent)
                    local_stop.set()

        threading.Thread(target=orphaned, daemon=True).start()
        EmbedWorker(settings, embedder, metrics).run(local_stop)
    except BaseException as exc:
        errors.put((slot.index, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise


_METRICS_DIR: str | None = None


def _metrics_dir() -> str:
    """This process's multi-process metrics directory, made (and the mode switched on) on first use."""
    global _METRICS_DIR
    if _METRICS_DIR is None:
        _METRICS_DIR = tempfile.mkdtemp(prefix="fusionrec-metrics-")
        atexit.register(shutil.rmtree, _METRICS_DIR, ignore_errors=True)
        enable_multiprocess(_METRICS_DIR)
    return _METRICS_DIR


class EmbedPool:
    """Starts, watches and restarts the worker processes; runs the backfill when the model changed."""

    def __init__(self, settings: Settings, workers: int | None = None, *, max_restarts: int = 5,
                 restart_window_s: float = 60.0, metrics: Metrics | None = None, progress: bool = True) -> None:
        self.settings = settings
        self.slots = plan(settings, workers)
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.progress = progress
        self.metrics_dir = _metrics_dir() if settings.embed.metrics_port else None
        self.metrics = metrics or Metrics()
        self._ctx = mp.get_context("spawn")
        self._errors = self._ctx.Queue()
        self._procs: dict[int, BaseProcess] = {}
        self._restarts: deque[float] = deque()
        self.restarts = 0
        self.backfill_done: bool | None = None

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; raises WorkerCrashedError when workers keep dying."""
        spec = ModelSpec.from_settings(self.settings)
        info = version_info(spec, self.settings)
        client = connect(self.settings)
        store = VectorStore(client, self.settings)
        backfill_thread = None
        prepared: list[tuple[bool, str | None]] = []
        # registering the version waits out Redis restarting, like every other loop
        if not retrying(lambda: prepared.append((prepare(store, info), store.active())), stage="prepare", stop=stop,
                        max_backoff_s=self.settings.stream.retry_max_backoff_s,
                        metrics=self.metrics.of(StreamMetrics)):
            client.close()
            return
        fill, active = prepared[-1]
        if fill:
            backfill_thread = threading.Thread(target=self._backfill, args=(stop,), name="backfill", daemon=True)
        log.info("embedding pool: %d workers (%s), model %s, version %s, active %s", len(self.slots),
                 ", ".join(s.device for s in self.slots), spec.model_id, info.version, active)
        client.close()
        if self.metrics_dir is not None:
            try:
                serve_multiprocess(self.settings.ops.metrics_host, self.settings.embed.metrics_port, self.metrics_dir)
            except OSError as exc:  # a busy port costs the pool its /metrics, not its work
                log.warning("cannot serve metrics on port %d: %s", self.settings.embed.metrics_port, exc)
        for slot in self.slots:
            self._start(slot)
        if backfill_thread is not None:
            backfill_thread.start()
        try:
            while not stop.wait(0.5):
                self._watch()
        finally:
            self._shutdown()

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.pid is not None and p.is_alive()]

    def _start(self, slot: Slot) -> None:
        proc = self._ctx.Process(target=worker_main, args=(self.settings, slot, self._errors),
                                 name=f"embed-worker-{slot.index}", daemon=False)
        proc.start()
        self._procs[slot.index] = proc

    def _watch(self) -> None:
        for slot in self.slots:
            proc = self._procs[slot.index]
            if proc.is_alive():
                continue
            if self.metrics_dir is not None and proc.pid is not None:
                process_exited(proc.pid, self.metrics_dir)
            error = self._last_error(slot.index)
            log.error("embedding worker %d (pid %s) exited with %s%s", slot.index, proc.pid, proc.exitcode,
                      f": {error[0]}" if error else "")
            now = time.monotonic()
            self._restarts.append(now)
            while self._restarts and now - self._restarts[0] > self.restart_window_s:
                self._restarts.popleft()
            if len(self._restarts) > self.max_restarts:
                detail = error[1] if error else f"exit code {proc.exitcode}"
                raise WorkerCrashedError(f"embedding worker {slot.index} died {len(self._restarts)} times "
                                         f"within {self.restart_window_s:.0f}s; last failure:\n{detail}")
            self.restarts += 1
            self.metrics.of(EmbedMetrics).embed_worker_restarts.inc()
            self._start(slot)

    def _last_error(self, index: int) -> tuple[str, str] | None:
        found = None
        while True:
            try:
                i, summary, tb = self._errors.get(timeout=0.2)
            except queue.Empty:
                return found
            if i == index:
                found = (summary, tb)

    def _backfill(self, stop: threading.Event) -> None:
        try:
            encoder = TextEncoder.from_settings(self.settings, device=self.slots[0].device,
                                                threads=self.slots[0].threads)
            embedder = build_embedder(self.settings, encoder, self.metrics, worker="backfill")
            backfill = Backfill(embedder, self.settings, self.metrics, progress=self.progress)
            done: list[bool] = []
            # resumable (what is embedded is skipped): a Redis restart or failover is waited out like every loop
            finished = retrying(lambda: done.append(backfill.run(stop)), stage="backfill", stop=stop,
                                max_backoff_s=self.settings.stream.retry_max_backoff_s,
                                metrics=self.metrics.of(StreamMetrics))
            self.backfill_done = finished and done[-1]
        except Exception:
            log.exception("backfill failed; the next pool start resumes it")
            self.backfill_done = False

    def _shutdown(self) -> None:
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: drain, commit, close
        deadline = time.monotonic() + 30
        for proc in self._procs.values():
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self._procs.values():
            if proc.is_alive():
                log.warning("worker pid %s did not drain in time; terminating", proc.pid)
                proc.kill()
                proc.join(5)
