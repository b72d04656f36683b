"""``python -m fusionrec`` is the ``fusionrec`` command."""

import sys

from fusionrec.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
