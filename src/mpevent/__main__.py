"""``python -m mpevent`` is the ``mpevent`` command."""

import sys

from mpevent.tools.cli import main

sys.exit(main())
