"""Metrics of the consume runtime: every confluent-kafka loop (user state, embedding workers,
learner) and its dead-letter publisher registers these."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from fusionrec.core.metrics import BATCH_BUCKETS, ConsumerLag, MetricSet, counter, gauge, histogram


class StreamMetrics(MetricSet):
    component = "consume runtime (fusionrec.streams)"
    events = counter("fusionrec_stream_events_total", "Valid events consumed", ("topic", "type"))
    dead_letters = counter("fusionrec_stream_dead_letters_total", "Messages sent to a dead-letter topic",
                           ("topic", "reason"))
    batch_size = histogram("fusionrec_stream_batch_messages", "Messages per consumed batch", buckets=BATCH_BUCKETS)
    batch_seconds = histogram("fusionrec_stream_batch_seconds", "Wall time to process one batch end to end")
    retries = counter("fusionrec_stream_retries_total", "Batch retries after a transient error", ("stage",))
    delivery_failures = counter("fusionrec_producer_delivery_failures_total", "Messages Kafka did not acknowledge",
                                ("topic",))
    # A gauge (summed over live processes in multi-process mode: a partition belongs to one consumer at a
    # time, and a partition given up is set to 0 before it is dropped, so the sum stays right).
    lag_messages = gauge("fusionrec_stream_consumer_lag_messages",
                         "Messages behind the high watermark, per assigned partition", ("topic", "partition"),
                         multiprocess_mode="livesum")

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.lag = ConsumerLag(self.lag_messages)
