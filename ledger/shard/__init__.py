"""The ledger's writers: the shard and coordinator cores, the group commit, and the Ray actors
that run them (thin shells that check the capability first, DESIGN §3d). Imports `ledger.store`
and `ledger.core`; nothing below imports it.
"""
