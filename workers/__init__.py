"""Programs that embed mpevent: the demo's and the load test's traffic source.

``workers.sipproxy`` is a SIP-proxy-like prefork UDP server whose children
raise ``E_SIP_REQUEST`` and ``E_PIKE_BLOCKED``; ``workers.traffic`` sends it
SIP-like requests from several loopback addresses, one of them flooding.
"""
