"""The shared-memory plane: where every byte of the segment lives and who writes it.

The layout (pure arithmetic), creating and attaching the segment, the
single-producer single-consumer lanes, the hub's subscription table, the
senders' doorbells and the single-writer counters summed into plain data.
"""
