"""A sender worker process: lanes in, datagrams out."""
