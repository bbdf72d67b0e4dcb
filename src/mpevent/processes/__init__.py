"""The processes of mpevent: what runs in producers, senders and the hub.

The producer's fast path (in every application process that raises), the
sender workers that drain lanes into sockets, the hub that supervises them,
and reclaiming the lanes of producers that died.
"""
