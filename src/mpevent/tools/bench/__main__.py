"""``python -m mpevent.tools.bench``: the benchmark's command line (see :mod:`.runner`)."""

import sys

from mpevent.tools.bench.runner import main

sys.exit(main())
