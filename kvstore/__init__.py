"""kvtier's KV block store: block pool, hashing, tier policies and tier backends.

Everything in this package except the tier backends is pure Python: it imports no torch, Ray or Redis.
"""
