"""Topic administration: create the event, catalog and dead-letter topics if they are missing."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from fusionrec.core.errors import FusionrecError
from fusionrec.core.settings import Settings
from fusionrec.streams.producer import kafka_config

log = logging.getLogger(__name__)


def all_topics(settings: Settings) -> list[str]:
    base = [settings.kafka.topic_events, settings.kafka.topic_catalog]
    derived = [settings.kafka.topic_feedback, settings.kafka.topic_item_deltas]
    return base + derived + [settings.dlq_topic(t) for t in (*base, settings.kafka.topic_feedback)]


def ensure_topics(settings: Settings, topics: Sequence[str] | None = None, partitions: int | None = None,
                  timeout: float = 15.0) -> list[str]:
    """Create missing topics; returns the ones created. Existing topics are left as they are."""
    admin = AdminClient(kafka_config(settings))
    wanted = list(topics or all_topics(settings))
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [t for t in wanted if t not in existing]
    if not missing:
        return []
    n = partitions or settings.kafka.partitions
    futures = admin.create_topics([NewTopic(t, n, settings.kafka.replication) for t in missing],
                                  request_timeout=timeout)
    created = []
    for topic, fut in futures.items():
        try:
            fut.result()
            created.append(topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise FusionrecError(f"could not create topic {topic}: {exc}") from exc
    log.info("created topics %s with %d partitions", created, n)
    return created
