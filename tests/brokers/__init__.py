"""The broker contract suite (SQLite and Redis) and the Redis-only tests."""
