"""Deployment files: valid JSON/YAML, and every metric a dashboard or rule names is one fusionrec exports."""

import json
import re

import pytest
import yaml

from fusionrec.apps.docs import metric_sets
from fusionrec.core.metrics import Metrics
from tests.paths import DEPLOY

METRIC = re.compile(r"\bfusionrec_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",)}


def exported() -> set[str]:
    names = set()
    metrics = Metrics()
    for kind in metric_sets():
        metrics.of(kind)
    for family in metrics.registry.collect():
        names.update(family.name + s for s in SUFFIXES[family.type])
        names.add(family.name)  # runbooks name a histogram by its family
    return names


def test_dashboard_is_valid_and_names_only_exported_metrics():
    dash = json.loads((DEPLOY / "grafana/dashboards/fusionrec.json").read_text())
    assert dash["uid"] == "fusionrec-overview" and dash["panels"]
    known = exported()
    seen = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "fusionrec-prometheus"
        for target in panel["targets"]:
            names = set(METRIC.findall(target["expr"]))
            assert names, target["expr"]
            assert names <= known, (panel["title"], names - known)
            seen |= names
    # the list: throughput, lag, freshness, DLQ, embed rate and latency, model metrics, reader latency
    for needed in ("fusionrec_stream_events_total", "fusionrec_stream_consumer_lag_messages",
                   "fusionrec_state_freshness_seconds_bucket", "fusionrec_stream_dead_letters_total",
                   "fusionrec_embed_items_total", "fusionrec_embed_encode_seconds_bucket",
                   "fusionrec_learner_prequential_hit_rate", "fusionrec_api_request_seconds_bucket"):
        assert needed in seen


def test_grafana_provisioning_points_at_the_dashboard_uid():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "fusionrec-prometheus"
    boards = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/fusionrec.yml").read_text())
    assert boards["providers"][0]["type"] == "file"


@pytest.mark.parametrize("name", ["rules.yml", "prometheus.yml"])
def test_prometheus_files_name_only_exported_metrics(name: str):
    text = (DEPLOY / "prometheus" / name).read_text()
    yaml.safe_load(text)
    assert set(METRIC.findall(text)) <= exported()


def test_compose_and_k8s_files_parse_and_agree_on_the_services():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("kafka", "redis", "prometheus", "grafana", "consumer", "embed-workers", "learner", "trending",
                 "reader"):
        assert name in services, name
    for name in ("consumer", "embed-workers", "learner", "trending", "reader"):
        assert services[name]["healthcheck"]["test"], name
    gpu = services["embed-workers"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    kinds = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert {"fusionrec-consumer", "fusionrec-embed-workers", "fusionrec-learner", "fusionrec-trending",
            "fusionrec-reader"} <= set(kinds["Deployment"])
    assert "fusionrec-reader" in kinds["HorizontalPodAutoscaler"]
