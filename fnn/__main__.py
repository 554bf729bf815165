"""``python -m fnn``: the ``fnn-train`` command (see ``python -m fnn --help``)."""

import sys

from fnn.cli import main

sys.exit(main())
