"""Pure protocol code: no sockets, processes or shared memory.

Payload encoding, destination parsing, the registry of events and
subscriptions, the destination policy, the daemon's configuration and the
MI method table. Everything here is tested without starting a process, and
every transport reuses it.
"""
