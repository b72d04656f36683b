"""The Kafka side of fusionrec. Its core is the consume loop, :class:`BatchConsumer` (validate →
apply → produce → store offsets; the order is documented in :mod:`.consumer`); applications publish
with :class:`EventProducer`. Also here: the event contract, dead letters, the state store, the
trending app (faust), replay and datasets."""

from fusionrec.streams.consumer import BatchConsumer
from fusionrec.streams.producer import EventProducer

__all__ = ["BatchConsumer", "EventProducer"]
