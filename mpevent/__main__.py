"""``python -m mpevent`` is the ``mpevent`` command."""

import sys

from .cli import main

sys.exit(main())
