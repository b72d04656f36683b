"""Prometheus for real: promtool checks the config and rules, a Prometheus server scrapes the pipeline, and the
Redis memory metrics follow a real Redis."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import EmbeddedServices, RedisClusterServices, free_port
from fusionrec.core.collector import THRESHOLDS
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.redis_memory import RedisMemoryMonitor
from fusionrec.core.settings import Settings
from fusionrec.streams.producer import EventProducer
from tests.integration.helpers import consume_until, wait_for
from tests.paths import DEPLOY

PROMETHEUS = DEPLOY / "prometheus"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs the Debian package prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


@pytest.mark.parametrize("args", [["check", "config", "prometheus.yml"], ["check", "config", "prometheus.compose.yml"],
                                  ["check", "rules", "rules.yml"],
                                  ["test", "rules", "rules_test.yml"]])
def test_promtool(args: list[str]):
    run = subprocess.run([_tool("promtool"), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def _query(base: str, expr: str) -> list[dict]:
    with urlopen(f"{base}/api/v1/query?{urlencode({'query': expr})}", timeout=5) as resp:  # noqa: S310
        body = json.loads(resp.read())
    assert body["status"] == "success"
    return body["data"]["result"]


def test_real_prometheus_scrapes_the_pipeline(settings: Settings, tmp_path: Path):
    binary = _tool("prometheus")
    s = settings.replace(metrics_port=free_port())
    with EventProducer(s) as producer:
        for n in range(50):
            producer.user_event({"event_id": f"e{n}", "type": "view" if n % 5 else "purchase", "user_id": f"u{n % 7}",
                                 "item_id": str(n % 11), "ts": 1_700_000_000_000 + n})
    metrics = Metrics()
    metrics.serve(s.ops.metrics_host, s.ops.metrics_port)
    with consume_until(s, 50, metrics=metrics):
        web = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{PROMETHEUS / 'rules.yml'}"]
scrape_configs:
  - job_name: fusionrec-state
    static_configs: [{{targets: ["127.0.0.1:{s.ops.metrics_port}"]}}]
""")
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{web}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{web}"
        try:
            deadline = time.monotonic() + 60
            found: list[dict] = []
            while not found and time.monotonic() < deadline:
                time.sleep(1)
                try:
                    found = _query(base, 'sum by (type) (fusionrec_stream_events_total{job="fusionrec-state"})')
                except OSError:
                    continue
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            by_type = {r["metric"]["type"]: float(r["value"][1]) for r in found}
            assert by_type == {"view": 40.0, "purchase": 10.0}
            # the recording rules evaluate against the scraped series too
            deadline = time.monotonic() + 30
            rule: list[dict] = []
            while not rule and time.monotonic() < deadline:
                time.sleep(1)
                rule = _query(base, "fusionrec:events:rate5m")
            assert {r["metric"]["type"] for r in rule} == {"view", "purchase"}
        finally:
            proc.terminate()
            proc.wait(30)


MiB = 1 << 20


def _served(port: int, name: str, node: str) -> float | None:
    """One sample of a /metrics endpoint, by metric and node; None when absent."""
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    return next((s.value for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name == name and s.labels.get("node") == node), None)


def test_the_consumer_serves_redis_memory_as_a_real_redis_reports_it(settings: Settings, tmp_path: Path):
    """A Redis of its own (its maxmemory moves): what the user-state process serves follows INFO as CONFIG SET
    changes maxmemory and as memory is used, and a write Redis refuses as out of memory is counted."""
    own = EmbeddedServices(tmp_path / "redis")
    running = own.up(kafka=False, persistence="none")
    assert running.redis is not None
    node = f"127.0.0.1:{running.redis.port}"
    s = settings.replace(redis_url=running.redis_url, redis_memory_poll_s=0.1, metrics_port=free_port())
    admin = connect(s)

    def served(name: str) -> float | None:
        return _served(s.ops.metrics_port, name, node)

    try:
        before = gc.get_threshold()
        with StatePipeline(s, metrics=Metrics(), serve_metrics=True):
            # (and while it runs, the collector's young generation is collected rarely; restored after)
            assert gc.get_threshold() == THRESHOLDS != before
            wait_for(lambda: served("fusionrec_redis_maxmemory_bytes") == 0, 30, "maxmemory 0 (no limit) served")
            used = served("fusionrec_redis_used_memory_bytes")
            assert used is not None and 0 < used < 256 * MiB
            assert served("fusionrec_redis_oom_errors_total") == 0
            admin.config_set("maxmemory", 512 * MiB)
            wait_for(lambda: served("fusionrec_redis_maxmemory_bytes") == 512 * MiB, 30, "the new maxmemory served")
            admin.set(f"{s.redis.prefix}:ballast", b"x" * (16 * MiB))
            wait_for(lambda: (served("fusionrec_redis_used_memory_bytes") or 0) >= used + 15 * MiB, 30,
                     "16 MiB more in use")
            admin.config_set("maxmemory", 1)  # below what is in use: every write is refused
            try:
                with pytest.raises(redis.exceptions.OutOfMemoryError):
                    admin.set(f"{s.redis.prefix}:more", "x")
            finally:
                admin.config_set("maxmemory", 0)
            wait_for(lambda: served("fusionrec_redis_oom_errors_total") == 1, 30, "the refused write counted")
            wait_for(lambda: served("fusionrec_redis_maxmemory_bytes") == 0, 30, "no limit again")
        assert gc.get_threshold() == before
    finally:
        admin.close()
        own.down()


def test_redis_memory_is_read_from_every_primary_of_a_cluster(redis_cluster: RedisClusterServices):
    client = connect(Settings.from_env({}, redis_url=redis_cluster.url))
    metrics = Metrics()
    first = redis.Redis(port=redis_cluster.nodes[0].port)
    first.config_set("maxmemory", 1 << 30)
    try:
        nodes = RedisMemoryMonitor(client, metrics, interval_s=0).refresh()
    finally:
        first.config_set("maxmemory", 0)
        first.close()
        client.close()
    names = [f"127.0.0.1:{n.port}" for n in redis_cluster.nodes]
    assert sorted(nodes) == sorted(names)
    assert [metrics.registry.get_sample_value("fusionrec_redis_maxmemory_bytes", {"node": n}) for n in names] == \
        [1 << 30, 0, 0]
    assert all((metrics.registry.get_sample_value("fusionrec_redis_used_memory_bytes", {"node": n}) or 0) > 0
               for n in names)
