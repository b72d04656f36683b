"""``python -m fusionrec`` is the ``fusionrec`` command."""

from fusionrec.apps.cli import main

if __name__ == "__main__":
    main()
