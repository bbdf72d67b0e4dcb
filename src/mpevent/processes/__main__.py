"""``python -m mpevent.processes ROLE SPEC``: a hub or a sender in a fresh interpreter.

Started by :mod:`mpevent.processes.launch`, which owns the contract.
"""

import sys

from mpevent.processes.launch import main

sys.exit(main(sys.argv[1:]))
