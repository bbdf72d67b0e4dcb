"""Tools built on the library: the ``mpevent`` command, the demo, the benchmark, a private hub."""
