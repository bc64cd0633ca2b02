"""``python -m medpruner.cli``: the same command as the ``medpruner`` script."""

import sys

from medpruner.cli import main

sys.exit(main())
