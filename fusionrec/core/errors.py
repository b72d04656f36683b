"""fusionrec's exception hierarchy: one root, a few one-line classes per concern."""


class FusionrecError(Exception):
    """Root of every error fusionrec raises on purpose."""


class ConfigError(FusionrecError):
    """A setting is missing or malformed."""


class ServiceError(FusionrecError):
    """An embedded service (broker, redis-server) could not be started, found or stopped."""


class InvalidEventError(FusionrecError):
    """An event violates the contract; ``reason`` is the low-cardinality DLQ reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeliveryError(FusionrecError):
    """Kafka did not acknowledge produced messages."""


class MissingTopicError(FusionrecError):
    """A topic fusionrec must write to does not exist on the broker (not retried: nothing would change)."""


class OffsetMismatchError(FusionrecError):
    """Redis holds state of offsets the topic no longer has (a recreated or truncated topic)."""


class StateStoreError(FusionrecError):
    """Redis rejected or could not apply a state update."""


class WorkerLostError(FusionrecError):
    """A worker process died or stopped answering; retried like a lost connection (a new one starts)."""
