"""The event producer against a broker that takes nothing (a closed port): bounded back-pressure."""

from __future__ import annotations

import time

import pytest

from fusionrec.apps.services import free_port
from fusionrec.core.errors import DeliveryError
from fusionrec.core.settings import Settings
from fusionrec.streams.producer import EventProducer


def test_a_full_local_queue_ends_in_a_delivery_error_not_a_caller_blocked_for_ever():
    s = Settings.from_env({}, kafka_bootstrap=f"127.0.0.1:{free_port()}")  # nothing listens there
    producer = EventProducer(s, producer_options={"queue.buffering.max.messages": 5, "log_level": 0},
                             max_block_s=0.5)
    event = {"event_id": "e", "type": "view", "user_id": "u", "item_id": "i", "ts": 1}
    for _ in range(5):
        producer.user_event(event)  # queued locally
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="stayed full for 0.5s"):
        producer.user_event(event)
    assert 0.4 < time.monotonic() - started < 5
    with pytest.raises(DeliveryError, match="still undelivered"):
        producer.flush(0.1)
