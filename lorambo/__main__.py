"""``python -m lorambo``: the ``lorambo`` command (``lorambo.cli``)."""

import sys

from lorambo.cli import main

sys.exit(main())
