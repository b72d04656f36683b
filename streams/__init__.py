"""The Kafka side of fusionrec. Its core is the consume runtime, :class:`ConsumeRuntime` (poll →
decode → process → dead letters → store offsets, the order documented in :mod:`.runtime`), on which
every stage runs: the user-state stream is :class:`BatchConsumer`. Applications publish with
:class:`EventProducer`. Also here: the event contract, dead letters, the state store, the trending
app (faust), replay and datasets."""

from fusionrec.streams.consumer import BatchConsumer
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.runtime import ConsumeRuntime

__all__ = ["BatchConsumer", "ConsumeRuntime", "EventProducer"]
