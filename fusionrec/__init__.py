"""fusionrec hub: settings, Redis key schema, metrics, embedded services and the CLI."""

from fusionrec.errors import FusionrecError
from fusionrec.keys import Keys
from fusionrec.metrics import Metrics
from fusionrec.settings import Settings

__all__ = ["FusionrecError", "Keys", "Metrics", "Settings"]
__version__ = "0.1.0"
