"""Prometheus for real: promtool checks the config and rules, and a Prometheus server scrapes the pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest

from fusionrec.apps.services import free_port
from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.streams.producer import EventProducer
from tests.integration.helpers import consume_until
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
