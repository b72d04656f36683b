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
    # the issue's list: throughput, lag, freshness, DLQ, embed rate and latency, model metrics, reader latency
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


def _acl_rules(text: str) -> list[str]:
    return " ".join(line for line in text.splitlines() if not line.startswith("#")).split()


def test_the_readers_redis_acl_is_one_rule_file_that_compose_and_k8s_both_use():
    """deploy/redis/reader.acl holds rules only (no user state or password), read-only single commands on
    fusionrec's keys; compose starts Redis with it and gives the reader that user; the Kubernetes ACL line
    holds the same rules. tests/integration/test_reader_acl.py runs the API over both."""
    rules = _acl_rules((DEPLOY / "redis/reader.acl").read_text())
    assert rules[:4] == ["resetkeys", "~fr:*", "resetchannels", "-@all"]
    assert all(re.fullmatch(r"\+[a-z_]+(\|[a-z_]+)?", rule) for rule in rules[4:]), rules
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    redis = services["redis"]
    assert "./redis/reader.acl:/etc/redis/reader.acl:ro" in redis["volumes"]
    script = redis["command"][2]
    assert script.startswith("set -f; exec redis-server ")
    assert script.endswith(' --user reader on ">$$REDIS_READER_PASSWORD" $$(grep -v "^#" /etc/redis/reader.acl)')
    assert redis["environment"]["REDIS_READER_PASSWORD"].startswith("${FUSIONREC_REDIS_READER_PASSWORD:?")
    for name in ("consumer", "embed-workers", "learner", "trending", "reader"):
        url = services[name]["environment"]["FUSIONREC_REDIS_URL"]
        user = "reader:${FUSIONREC_REDIS_READER_PASSWORD:?" if name == "reader" else ":${FUSIONREC_REDIS_PASSWORD:?"
        assert url.startswith("redis://" + user), (name, url)
    docs = {(d["kind"], d["metadata"]["name"]): d for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if d}
    line = docs[("ConfigMap", "fusionrec-redis-acl")]["data"]["users.acl"].split()
    assert line == ["user", "fusionrec-reader", "on", *rules]
    reader_url = docs[("Secret", "fusionrec-reader")]["stringData"]["FUSIONREC_REDIS_URL"]
    assert reader_url.startswith("rediss+cluster://fusionrec-reader:")
    [container] = docs[("Deployment", "fusionrec-reader")]["spec"]["template"]["spec"]["containers"]
    secret = {"secretKeyRef": {"name": "fusionrec-reader", "key": "FUSIONREC_REDIS_URL"}}
    assert {"name": "FUSIONREC_REDIS_URL", "valueFrom": secret} in container["env"]
