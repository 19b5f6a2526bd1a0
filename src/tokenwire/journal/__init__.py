"""Where producers and readers meet: a numbered, replayable log of events per stream
(``Journal``), and beside it the control plane replicas share (``ControlPlane``)."""

from typing import Any

from tokenwire.journal.base import Journal, StreamMeta
from tokenwire.journal.control import ControlPlane, LocalControlPlane
from tokenwire.journal.memory import MemoryJournal

__all__ = [
    "ControlPlane",
    "Journal",
    "LocalControlPlane",
    "MemoryJournal",
    "StreamMeta",
    "open_journal",
]


def open_journal(url: str, **options: Any) -> Journal:
    """``memory``, ``redis://HOST:PORT/DB`` or ``redis+sentinel://HOST:PORT[,…]/MASTER[/DB]``;
    the journal's ``control`` is its control plane."""
    if url == "memory":
        return MemoryJournal(**options)
    if url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
        from tokenwire.journal.redis import RedisJournal

        journal: Journal = RedisJournal(url, **options)
        return journal
    raise ValueError(
        f"unknown journal {url!r}: use 'memory', 'redis://HOST:PORT/DB' or "
        "'redis+sentinel://HOST:PORT[,HOST:PORT]/MASTER[/DB]'"
    )
