"""Programs that embed mpevent: the demo's and the load test's traffic source.

This directory is installed as ``mpevent.workers`` (pyproject.toml maps it),
never as a top-level package of its own. ``mpevent.workers.sipproxy`` is a
SIP-proxy-like prefork UDP server whose children raise ``E_SIP_REQUEST`` and
``E_PIKE_BLOCKED``; ``mpevent.workers.traffic`` sends it SIP-like requests
from several loopback addresses, one of them flooding.
"""
