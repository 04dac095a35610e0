import sys

from lorambo.cli import main

sys.exit(main())
