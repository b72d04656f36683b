"""fusionrec: a streaming recommender that learns online.

One installed module, layered from the floor up (each layer imports only those below it):

* ``fusionrec.core``     settings, Redis key schema, errors, metrics, Redis client, Lua scripts
* ``fusionrec.streams``  Kafka side: event contract, producer, consume loop, state store, trending
* ``fusionrec.models``   the catalog text encoder and the embedding worker pool
* ``fusionrec.online``   candidates → learning → ranking → serving
* ``fusionrec.apps``     CLI, demo, pipeline wiring, embedded services, evaluation

>>> from fusionrec import Settings
>>> Settings.from_env({}).kafka.topic_events
'events'
"""

from fusionrec.core.settings import Settings

__all__ = ["Settings"]
__version__ = "0.1.0"
