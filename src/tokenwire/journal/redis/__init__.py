"""The Redis store: an event log (``log.py``) and a control plane (``control.py``) over one
client (``client.py``), so many replicas share streams, Stop, readers and producer liveness."""

from tokenwire.journal.redis.control import RedisControlPlane
from tokenwire.journal.redis.log import RedisJournal

__all__ = ["RedisControlPlane", "RedisJournal"]
