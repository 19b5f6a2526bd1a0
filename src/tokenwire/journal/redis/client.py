"""The one Redis client the Redis event log and control plane share: connection, key layout,
Lua scripts, and the translation of redis-py errors.

Keys (``prefix`` defaults to ``tw:``; ``{id}`` is a hash tag keeping one stream's keys in one
Redis Cluster slot):

- ``tw:{id}:events``  Redis Stream. The event with seq n has the explicit entry id ``0-(n+1)``,
  so "after seq n" is ``XREAD`` from ``0-(n+1)``, and re-appending an event Redis already
  holds is recognised and skipped (appends are idempotent).
- ``tw:{id}:meta``    hash: ``meta`` (StreamMeta JSON), ``producer`` (node id; empty when
  released), ``done`` (set with the terminal event, after which nothing may be appended),
  ``cancel`` (a pending Stop), ``suspect`` (when the producer was first seen dead).
- ``tw:{id}:readers`` sorted set, reader id -> wall time it is known connected until.
- ``tw:{id}:gone``    tombstone written with the terminal event that outlives the stream by
  ``tombstone_ttl``: an expired id answers 410, an id never seen 404.
- ``tw:node:{node}``  producer heartbeat, expiring after ``liveness`` s.
- ``tw:name:{name}``  a wire's own name for a stream -> stream id (the UI message stream's
  chat id, per API key); expires an hour after the stream's retention would.
- ``tw:active``       hash stream id -> producing node (the dead-producer sweep walks it).
- ``tw:finished``     sorted set stream id -> finish time (the ``max_finished`` bound).
- channel ``tw:cancel``: ``"<id> <reason>"``.

``tw:active``, ``tw:finished`` and the node keys are per deployment, not per stream, so the
scripts that touch them with a stream's keys would cross slots in Redis Cluster (see
docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Iterator
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from tokenwire.errors import JournalError
from tokenwire.events import Event, event_from_dict

__all__ = [
    "RedisClient",
    "StreamKeys",
    "connect",
    "decode",
    "encode",
    "encode_json",
    "guarded",
    "translated",
]

# Lua that marks a stream ended once its terminal event is written (``ENDED`` in APPEND and
# FINALIZE, which share its KEYS and ARGV[3..6]): done, the TTLs of its keys, its tombstone,
# out of the active set, into the finished index.
_ENDED = """\
redis.call('HSET', KEYS[2], 'done', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[6], ARGV[3])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
redis.call('HDEL', KEYS[4], ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
"""

# Appends events; idempotent (entries Redis holds are skipped) and fenced (only the stream's
# producer may append). Errors: TWLOST (Redis lost the stream: restore it), TWDONE (it has
# ended), TWOWNER <node> (another node produces it), TWGAP <n> (Redis holds only entries up
# to 0-n: resend from seq n).
# KEYS: events, meta, gone, active, finished, readers
# ARGV: first_seq, terminal (0|1), ttl_ms, gone_ttl_ms, stream_id, now, node, payload...
APPEND = """
local state = redis.call('HMGET', KEYS[2], 'producer', 'done')
local producer = state[1]
if not producer then
  if redis.call('EXISTS', KEYS[3]) == 1 then
    return redis.error_reply('TWDONE the stream already has its terminal event')
  end
  return redis.error_reply('TWLOST the stream is missing from Redis')
end
if state[2] then
  return redis.error_reply('TWDONE the stream already has its terminal event')
end
if producer ~= ARGV[7] then return redis.error_reply('TWOWNER ' .. producer) end
local top = 0
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then top = tonumber(string.match(last[1][1], '%-(%d+)$')) end
local seq = tonumber(ARGV[1])
if top < seq then return redis.error_reply('TWGAP ' .. top) end
for i = 8, #ARGV do
  seq = seq + 1
  if seq > top then
    redis.call('XADD', KEYS[1], '0-' .. string.format('%d', seq), 'e', ARGV[i])
  end
end
if ARGV[2] == '1' then
ENDED
end
return seq
""".replace("ENDED\n", _ENDED)

# Re-creates a stream Redis lost (restarted empty, failed over before it replicated), with
# this node as its producer and alive, so no reader takes it for orphaned meanwhile.
# KEYS: meta, gone, active, node   ARGV: meta JSON, node, stream_id, liveness_ms
RESTORE = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('TWDONE the stream already has its terminal event')
end
redis.call('SET', KEYS[4], '1', 'PX', ARGV[4])
if redis.call('HEXISTS', KEYS[1], 'producer') == 0 then
  redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'producer', ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[2])
elseif redis.call('HEXISTS', KEYS[1], 'meta') == 0 then
  redis.call('HSET', KEYS[1], 'meta', ARGV[1])
end
return 1
"""

# Ends a stream whose producer no longer heartbeats. The producer must be seen dead twice,
# ``grace_ms`` apart (Redis's own clock), before the stream is ended: a producer whose beat
# was lost to a Redis restart has that long to beat again. Returns -1: no such stream, -2: it
# has ended already, 0: its producer is alive (or only suspected), n > 0: wrote the failed
# event with entry id 0-n. With ``dry`` (ARGV[8] = 1) it writes nothing and returns -3 where
# it would end the stream (takeover decides), at once for a released stream (producer '').
# KEYS: events, meta, gone, active, finished, readers
# ARGV: node key prefix, payload, ttl_ms, gone_ttl_ms, stream_id, now, grace_ms, dry
FINALIZE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[2], 'done') == 1 then return -2 end
local node = redis.call('HGET', KEYS[2], 'producer')
if node and node ~= '' and redis.call('EXISTS', ARGV[1] .. node) == 1 then
  redis.call('HDEL', KEYS[2], 'suspect')
  return 0
end
if ARGV[8] == '1' and node == '' then return -3 end
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local suspect = redis.call('HGET', KEYS[2], 'suspect')
if not suspect then
  redis.call('HSET', KEYS[2], 'suspect', now_ms)
  return 0
end
if now_ms - tonumber(suspect) < tonumber(ARGV[7]) then return 0 end
if ARGV[8] == '1' then return -3 end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local n = 1
if #last > 0 then n = tonumber(string.match(last[1][1], '%-(%d+)$')) + 1 end
redis.call('XADD', KEYS[1], '0-' .. string.format('%d', n), 'e', ARGV[2])
ENDED
return n
""".replace("ENDED\n", _ENDED)

# Makes this node the producer of a stream whose producer is dead or released it.
# Returns {1, top entry number, previous producer}, {2, top, node} if this node produces it
# already (a claim retried by redis-py after a dropped connection), or {0} alive,
# {-1} missing, {-2} ended.
# KEYS: events, meta, active   ARGV: node key prefix, node, stream_id
CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end
if redis.call('HEXISTS', KEYS[2], 'done') == 1 then return {-2} end
local node = redis.call('HGET', KEYS[2], 'producer') or ''
local top = 0
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then top = tonumber(string.match(last[1][1], '%-(%d+)$')) end
if node == ARGV[2] then return {2, top, node} end
if node ~= '' and redis.call('EXISTS', ARGV[1] .. node) == 1 then return {0} end
redis.call('HSET', KEYS[2], 'producer', ARGV[2])
redis.call('HDEL', KEYS[2], 'suspect')
redis.call('HSET', KEYS[3], ARGV[3], ARGV[2])
return {1, top, node}
"""

# Gives a stream up: its producer field is emptied, so the next claim wins at once; in
# ``active`` it is listed under no node, so every replica's dead-producer sweep sees it.
# KEYS: meta, active   ARGV: node, stream_id
RELEASE = """
if redis.call('HGET', KEYS[1], 'producer') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'producer', '')
  redis.call('HSET', KEYS[2], ARGV[2], '')
  return 1
end
return 0
"""


class StreamKeys(NamedTuple):
    events: str
    meta: str
    gone: str
    active: str
    finished: str
    readers: str


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """redis-py errors become ``JournalError`` here, at the module's edge."""
    try:
        yield
    except RedisError as exc:
        raise JournalError(f"Redis journal: {action} failed: {exc}") from exc


_T = TypeVar("_T")


async def guarded(operation: Awaitable[_T]) -> _T:
    """Run one Redis operation in a task of its own and cancel only the wait for it.

    redis-py's asyncio client can absorb a CancelledError that lands mid-command (measured:
    a large share of cancels were lost), so a reader whose client left would read on for
    ever. Here the operation finishes on its own and the caller sees the cancellation.
    """
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_retrieve)
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it


def encode(event: Event) -> bytes:
    data = event.to_dict()
    del data["seq"]  # the entry id carries it
    return encode_json(data)


def encode_json(value: Any) -> bytes:
    """``orjson.dumps(value)`` in a bytes object of its own size. orjson's result keeps the
    allocation of its output buffer (~4 KB, however short the JSON), and a producer keeps
    its stream's metadata and every event until the terminal one is stored: 4 KB each
    instead of ~100 B (``benchmarks/idle_capacity.py --breakdown``, issue 19 item 3)."""
    return bytes(memoryview(orjson.dumps(value)))


def decode(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    data = orjson.loads(fields[b"e"])
    data["seq"] = int(entry_id.rsplit(b"-", 1)[1]) - 1
    return event_from_dict(data)


#: redis-py retries a command that met a dead connection; a couple of quick retries cover
#: a stale pooled connection after a restart or failover, and the journal's own loops retry
#: a longer outage with their own bounds (redis-py's default would block a call for seconds).
_RETRY = Retry(ExponentialBackoff(cap=0.2, base=0.02), 2)


def connect(url: str) -> Any:
    """A client for ``redis://…``, ``rediss://…``, ``unix://…`` or, through Redis Sentinel,
    ``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB]``: the master's
    address is asked of the sentinels on every new connection, so after a failover the next
    command reaches the new master (and a demoted master's READONLY reply drops the
    connection: redis-py's ``SentinelManagedConnection``)."""
    options: dict[str, Any] = {"socket_connect_timeout": 5.0, "retry": _RETRY}
    if not url.startswith("redis+sentinel://"):
        return aioredis.Redis.from_url(url, **options)
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    path = [p for p in parts.path.split("/") if p]
    if not hosts or not path:
        raise ValueError(
            f"bad Sentinel URL {url!r}: use redis+sentinel://HOST:PORT[,HOST:PORT]/MASTER[/DB]"
        )
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        sentinels.append((name or "127.0.0.1", int(port or 26379)))
    if parts.password:
        options["password"] = parts.password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels, sentinel_kwargs={"socket_connect_timeout": 2.0, "socket_timeout": 2.0}
    )
    return sentinel.master_for(path[0], db=int(path[1]) if len(path) > 1 else 0, **options)


class RedisClient:
    """The connection and key layout; one per process, shared by the log and control plane."""

    def __init__(self, url: str, *, prefix: str = "tw:") -> None:
        self.url = url
        self.prefix = prefix
        #: This process, as a producer: its heartbeat key and the ``producer`` of its streams.
        self.node = secrets.token_hex(8)
        # Typed as Any: redis-py's stubs return unions of every RESP decoding per command.
        self.redis: Any = connect(url)
        self.tasks: set[asyncio.Task[Any]] = set()
        self._scripts: dict[str, Any] = {}
        self._shas: dict[str, str] = {}

    def keys(self, stream_id: str) -> StreamKeys:
        p = self.prefix
        base = f"{p}{{{stream_id}}}"
        return StreamKeys(
            f"{base}:events",
            f"{base}:meta",
            f"{base}:gone",
            f"{p}active",
            f"{p}finished",
            f"{base}:readers",
        )

    def node_key(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def name_key(self, name: str) -> str:
        return f"{self.prefix}name:{name}"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}cancel"

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, kept until it ends (``close`` waits for it)."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script on NOSCRIPT (a restarted or flushed Redis)."""
        registered = self._scripts.get(script)
        if registered is None:
            registered = self._scripts[script] = self.redis.register_script(script)
        return await registered(keys=keys, args=args)

    async def run_many(self, script: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """``script`` once per call, in one pipeline; results or exceptions, one per call.

        Plain EVALSHA rather than redis-py's Script objects: those send SCRIPT EXISTS before
        every pipeline, doubling the round trips. NOSCRIPT (a restarted or flushed Redis)
        loads the script and retries the calls it refused, which did not run.
        """
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = self.redis.register_script(script).sha
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            try:
                if len(pending) == 1:
                    # The common case while tokens trickle in: skip the pipeline machinery.
                    keys, args = calls[pending[0]]
                    try:
                        answers = [await self.redis.evalsha(sha, len(keys), *keys, *args)]
                    except ResponseError as exc:
                        answers = [exc]
                else:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for index in pending:
                            keys, args = calls[index]
                            pipe.evalsha(sha, len(keys), *keys, *args)
                        answers = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                for index in pending:
                    results[index] = exc
                return results
            refused = []
            for index, answer in zip(pending, answers, strict=True):
                results[index] = answer
                if isinstance(answer, NoScriptError):
                    refused.append(index)
            if not refused or attempt:
                break
            try:
                sha = self._shas[script] = await self.redis.script_load(script)
            except (RedisError, OSError) as exc:
                for index in refused:
                    results[index] = exc
                break
            pending = refused
        return results

    # -- reading -----------------------------------------------------------------------

    async def close(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5.0)
        with contextlib.suppress(RedisError):
            await self.redis.aclose()
