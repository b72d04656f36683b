"""Kafka side of fusionrec: the event contract, the producer, and the user-state stream."""

from streams.consumer import Batch, BatchConsumer
from streams.contract import CatalogEvent, UserEvent, Validator
from streams.producer import EventProducer
from streams.state import StateStore
from streams.user_state import UserStateHandler

__all__ = ["Batch", "BatchConsumer", "CatalogEvent", "EventProducer", "StateStore", "UserEvent",
           "UserStateHandler", "Validator"]
