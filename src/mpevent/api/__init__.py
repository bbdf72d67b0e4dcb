"""The public APIs: the embedded bus, attaching to a daemon, the daemon, MI clients."""
