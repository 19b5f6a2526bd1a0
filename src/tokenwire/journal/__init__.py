"""Where producers and readers meet: a numbered, replayable log of events per stream."""

from typing import Any

from tokenwire.journal.base import Journal, StreamMeta
from tokenwire.journal.memory import MemoryJournal

__all__ = ["Journal", "MemoryJournal", "StreamMeta", "open_journal"]


def open_journal(url: str, **options: Any) -> Journal:
    """``memory`` or ``redis://HOST:PORT/DB``."""
    if url == "memory":
        return MemoryJournal(**options)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from tokenwire.journal.redis import RedisJournal

        journal: Journal = RedisJournal(url, **options)
        return journal
    raise ValueError(f"unknown journal {url!r}: use 'memory' or 'redis://HOST:PORT/DB'")
