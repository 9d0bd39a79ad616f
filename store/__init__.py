"""Persistence and messaging: PostgreSQL through asyncpg, pub/sub through a Broker.

Knows nothing of WebSockets or HTTP. Driver exceptions stop at this package's
boundary and leave it as `store.errors` types carrying protocol error codes.
"""
