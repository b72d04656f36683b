"""The floor every stage stands on: one frozen :class:`Settings` per process.

Also here: the Redis key schema (:mod:`.keys`), errors, the metric sets' base and the process
registry (:mod:`.metrics`), the Redis client factory and the Lua scripts. Nothing in ``core``
imports a stage.
"""

from fusionrec.core.settings import Settings

__all__ = ["Settings"]
