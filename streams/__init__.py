"""Kafka side of fusionrec: the event contract, the producer, and the user-state stream."""

from fusionrec.streams.consumer import Batch, BatchConsumer
from fusionrec.streams.contract import CatalogEvent, UserEvent, Validator
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.state import StateStore
from fusionrec.streams.user_state import UserStateHandler

__all__ = ["Batch", "BatchConsumer", "CatalogEvent", "EventProducer", "StateStore", "UserEvent",
           "UserStateHandler", "Validator"]
