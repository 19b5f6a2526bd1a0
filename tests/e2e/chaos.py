"""Chaos harness: three ``tokenwire serve`` replicas behind nginx, sharing Redis through
Sentinel, many concurrent streams (the embedded model at temperature 0, and a scripted
upstream), and faults injected while they run: clients dropping and resuming anywhere, a
replica SIGKILLed and restarted, a Redis master failover, a Redis restart, and a
rolling SIGTERM restart of every replica.

Every stream is checked as its client saw it across all its connections: sequence numbers
0…n with no gap and no repeat, exactly one terminal event, last; a replay of the stream from
Redis equals it; an embedded stream's text equals an uninterrupted run's (or, where it ended
early, is a prefix of it). ``tests/e2e/test_chaos.py`` runs it bounded; ``benchmarks/soak.py``
runs it for longer and reports the counts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from tests.fault_upstream import fault_upstream

from ..conftest import ARTIFACTS, free_port, wait_until_healthy
from .services import Sentinel, nginx, redis_sentinel

__all__ = ["ChaosReport", "ChaosSettings", "run_chaos", "summary"]

TERMINAL = ("stream.completed", "stream.cancelled", "stream.failed")
#: Prompts the embedded model answers at length (greedy), so faults meet answers mid-way.
PROMPTS = [
    "Count from 1 to 200, separated by commas.",
    "Write a long story about a dragon who learns to sing.",
    "List the numbers from 50 to 150, one per line.",
    "Explain in detail how a bicycle works.",
]


@dataclass
class ChaosSettings:
    embedded_streams: int = 8
    upstream_streams: int = 24
    #: Seconds over which streams are started (so faults meet them at every stage).
    launch_over: float = 20.0
    embedded_max_tokens: int = 64
    #: Chance a connection is dropped by its client (then resumed) before the stream ends.
    drop_chance: float = 0.5
    #: Each cycle: replica SIGKILL + restart, Redis failover, Redis restart, rolling restart.
    cycles: int = 1
    seed: int = 7
    deadline: float = 240.0
    drain_timeout: float = 3.0


@dataclass
class StreamResult:
    kind: str  # "embedded" | "upstream"
    prompt: str
    stream_id: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    drops: int = 0
    error: str | None = None

    @property
    def terminal(self) -> dict[str, Any] | None:
        return self.events[-1] if self.events and self.events[-1]["type"] in TERMINAL else None

    def outcome(self) -> str:
        terminal = self.terminal
        if terminal is None:
            return f"no terminal ({self.error})"
        if terminal["type"] == "stream.failed":
            return f"failed:{terminal['error'].get('code')}"
        if terminal["type"] == "stream.cancelled":
            return f"cancelled:{terminal.get('reason')}"
        return "completed"

    def text(self) -> str:
        return "".join(e.get("text", "") for e in self.events if e["type"] == "text.delta")


@dataclass
class ChaosReport:
    streams: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    outcomes_by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    embedded_identical: int = 0
    embedded_prefix: int = 0
    embedded_continued: int = 0
    connections: int = 0
    drops: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "faults": dict(self.faults),
            "outcomes": dict(self.outcomes),
            "outcomes_by_kind": {k: dict(v) for k, v in self.outcomes_by_kind.items()},
            "embedded_identical": self.embedded_identical,
            "embedded_prefix_consistent": self.embedded_prefix,
            "embedded_taken_over": self.embedded_continued,
            "connections": self.connections,
            "client_drops": self.drops,
            "problems": self.problems,
            "seconds": round(self.seconds, 1),
        }


class Replica:
    """One ``tokenwire serve`` on a fixed port, so nginx finds it again after a restart."""

    def __init__(self, port: int, args: list[str]) -> None:
        self.port = port
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (ARTIFACTS / f"chaos-{self.port}-{self.starts}.log").open("wb")
        env = {**os.environ, "TOKENWIRE_LOG_LEVEL": "warning"}
        command = [sys.executable, "-m", "tokenwire.cli.main", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, *self.args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        wait_until_healthy(f"{self.url}/healthz", self.process, timeout=90)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def terminate(self, timeout: float) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate(30)


@contextmanager
def cluster(settings: ChaosSettings) -> Iterator[tuple[Sentinel, list[Replica], str, str]]:
    """Sentinel-managed Redis, a scripted upstream, three replicas, nginx in front."""
    with ExitStack() as stack:
        # AOF on both, as Redis's docs advise for Sentinel: a restarted Redis comes back with
        # its data (an empty master that restarts faster than the sentinel's down-after wipes
        # its replica too; tests/e2e/test_redis_outages.py covers an empty restart without
        # Sentinel). Down-after 3 s: a master restarting (under load, AOF loaded) must not
        # race a failover, or both instances act as master for a while and the writes of the
        # one demoted later are dropped — a split brain Redis does not protect against
        # without min-replicas-to-write, and then writes stop whenever the replica is away.
        sentinel = stack.enter_context(redis_sentinel(durable=True, down_after_ms=3000))
        upstream = stack.enter_context(fault_upstream())
        args = ["--journal", sentinel.url, "--upstream", f"fault={upstream.url}",
                "--threads", "1", "--parallel", "4", "--disconnect-grace", "30",
                "--heartbeat", "1", "--drain-timeout", str(settings.drain_timeout)]  # fmt: skip
        replicas = [Replica(free_port(), args) for _ in range(3)]
        for replica in replicas:
            stack.callback(replica.stop)
            replica.start()
        proxy = stack.enter_context(nginx([r.port for r in replicas]))
        yield sentinel, replicas, proxy.url, upstream.url


def follow(base: str, body: dict[str, Any], result: StreamResult, rng: random.Random,
           drop_chance: float, deadline: float) -> None:  # fmt: skip
    """Start the stream, then read it to its terminal event across as many connections as
    it takes: drops (on purpose, at a random event) and cut connections resume after the
    last seq received."""
    with httpx.Client(timeout=httpx.Timeout(30.0, read=60.0)) as client:
        while time.monotonic() < deadline:
            if result.stream_id is None:
                request = client.build_request("POST", f"{base}/v1/streams", json=body)
            else:
                last = result.events[-1]["seq"] if result.events else -1
                request = client.build_request(
                    "GET", f"{base}/v1/streams/{result.stream_id}",
                    headers={"Last-Event-ID": str(last)},
                )  # fmt: skip
            result.connections += 1
            drop_at = rng.randint(1, 30) if rng.random() < drop_chance else None
            try:
                response = client.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        result.error = f"HTTP {response.status_code}"
                        time.sleep(0.3)
                        continue
                    result.stream_id = result.stream_id or response.headers["x-stream-id"]
                    if read_until(response, result, drop_at):
                        return
                    result.drops += drop_at is not None
                finally:
                    response.close()
            except httpx.HTTPError as exc:
                result.error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2)
        result.error = f"deadline ({result.error})"


def read_until(response: httpx.Response, result: StreamResult, drop_at: int | None) -> bool:
    """Read events until the terminal one (True) or the planned drop / end of body."""
    read = 0
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        result.events.append(orjson.loads(line[5:]))
        read += 1
        if result.events[-1]["type"] in TERMINAL:
            return True
        if drop_at is not None and read >= drop_at:
            return False
    return False


def reference_texts(base: str, settings: ChaosSettings) -> dict[str, str]:
    """Each embedded prompt's uninterrupted answer (temperature 0), before any fault (read
    like every other stream, so a connection cut under load resumes instead of failing)."""
    results = [StreamResult("embedded", prompt) for prompt in PROMPTS]
    threads = [
        threading.Thread(
            target=follow,
            args=(
                base,
                embedded_body(r.prompt, settings),
                r,
                random.Random(0),
                0.0,
                time.monotonic() + 180,
            ),
        )
        for r in results
    ]
    for thread in threads:  # together: the replicas batch them, as they will the real ones
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        assert result.outcome() == "completed", (result.prompt, result.outcome(), result.error)
    return {result.prompt: result.text() for result in results}


def embedded_body(prompt: str, settings: ChaosSettings) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "seed": 1, "max_tokens": settings.embedded_max_tokens}  # fmt: skip


def upstream_body(rng: random.Random) -> dict[str, Any]:
    n, gap = rng.randint(80, 200), rng.choice([0.02, 0.05])
    return {"model": "trickle", "messages": [{"role": "user", "content": f"n={n} gap={gap}"}]}


class Faults(threading.Thread):
    """Injects the faults, in order, while the streams run."""

    def __init__(self, sentinel: Sentinel, replicas: list[Replica], settings: ChaosSettings,
                 rng: random.Random, report: ChaosReport) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.sentinel, self.replicas, self.settings = sentinel, replicas, settings
        self.rng, self.report = rng, report
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(self.settings.cycles):
                self.cycle()
        except BaseException as exc:
            self.error = exc

    def cycle(self) -> None:
        time.sleep(3)
        victim = self.rng.choice(self.replicas)
        victim.kill()
        self.report.faults["replica SIGKILL"] += 1
        time.sleep(1.5)
        victim.start()
        time.sleep(2)
        self.failover()
        time.sleep(3)
        self.restart_master()
        time.sleep(3)
        for replica in self.replicas:  # rolling restart: one at a time, under load
            replica.terminate(self.settings.drain_timeout + 20)
            self.report.faults["replica SIGTERM (rolling)"] += 1
            replica.start()
            time.sleep(1)

    def failover(self) -> None:
        """SIGKILL the master; the sentinel promotes the replica; the old master comes back
        as a replica of the new one."""
        sentinel = self.sentinel
        old_port = sentinel.master_port()
        old = sentinel.master if sentinel.master.port == old_port else sentinel.replica
        new = sentinel.replica if old is sentinel.master else sentinel.master
        old.kill()
        sentinel.wait_for_failover(away_from=old_port)
        self.report.faults["Redis master failover"] += 1
        old.replica_of = new.port
        old.start()

    def restart_master(self) -> None:
        """SIGKILL the master and start it again at once on its port, from its AOF: faster
        than the sentinel's down-after, so no failover happens."""
        sentinel = self.sentinel
        port = sentinel.master_port()
        master = sentinel.master if sentinel.master.port == port else sentinel.replica
        master.kill()
        master.replica_of = None
        master.start()
        self.report.faults["Redis restart"] += 1


def run_chaos(settings: ChaosSettings) -> ChaosReport:
    report = ChaosReport()
    rng = random.Random(settings.seed)
    started = time.monotonic()
    with cluster(settings) as (sentinel, replicas, base, _upstream):
        references = reference_texts(base, settings)
        deadline = time.monotonic() + settings.deadline
        results: list[StreamResult] = []
        threads: list[threading.Thread] = []
        kinds = ["embedded"] * settings.embedded_streams + ["upstream"] * settings.upstream_streams
        rng.shuffle(kinds)
        faults = Faults(sentinel, replicas, settings, random.Random(settings.seed + 1), report)
        faults.start()
        for index, kind in enumerate(kinds):
            prompt = PROMPTS[index % len(PROMPTS)]
            body = embedded_body(prompt, settings) if kind == "embedded" else upstream_body(rng)
            result = StreamResult(kind, prompt)
            results.append(result)
            thread = threading.Thread(
                target=follow,
                args=(
                    base,
                    body,
                    result,
                    random.Random(rng.random()),
                    settings.drop_chance,
                    deadline,
                ),
                daemon=True,
            )
            thread.start()
            threads.append(thread)
            time.sleep(settings.launch_over / len(kinds))
        for thread in threads:
            thread.join(max(1.0, deadline - time.monotonic()))
        faults.join(max(1.0, deadline - time.monotonic()))
        if faults.error is not None:
            report.problems.append(f"fault injection failed: {faults.error!r}")
        check(results, references, base, report)
    report.seconds = time.monotonic() - started
    return report


def check(results: list[StreamResult], references: dict[str, str], base: str,
          report: ChaosReport) -> None:  # fmt: skip
    report.streams = len(results)
    for result in results:
        report.outcomes[result.outcome()] += 1
        report.outcomes_by_kind.setdefault(result.kind, Counter())[result.outcome()] += 1
        report.connections += result.connections
        report.drops += result.drops
        name = f"{result.kind} stream {result.stream_id}"
        seqs = [e["seq"] for e in result.events]
        if seqs != list(range(len(seqs))):
            report.problems.append(f"{name}: seqs not contiguous: {seqs}")
        terminals = [e for e in result.events if e["type"] in TERMINAL]
        if len(terminals) != 1 or result.terminal is None:
            report.problems.append(f"{name}: {len(terminals)} terminal events ({result.error})")
            continue
        replay = httpx.get(f"{base}/v1/streams/{result.stream_id}?after=-1", timeout=60)
        stored = [orjson.loads(line[5:]) for line in replay.text.splitlines()
                  if line.startswith("data:")]  # fmt: skip
        if stored != result.events:
            report.problems.append(f"{name}: replay differs: {difference(stored, result, replay)}")
        if result.kind == "embedded":
            check_text(result, references[result.prompt], name, report)


def check_text(result: StreamResult, reference: str, name: str, report: ChaosReport) -> None:
    """Temperature 0: the text an uninterrupted run gives; where it ended early, a prefix
    of it; after a takeover (a ``progress`` event, stage ``takeover``), what came before it
    a prefix of it and the continuation counted (identical, or only prefix-consistent:
    the new replica re-reads the partial answer and may take another path)."""
    text = result.text()
    cut = next((i for i, e in enumerate(result.events)
                if e["type"] == "progress" and e.get("stage") == "takeover"), None)  # fmt: skip
    if cut is not None:
        report.embedded_continued += 1
        before = "".join(
            e.get("text", "") for e in result.events[:cut] if e["type"] == "text.delta"
        )
        if not reference.startswith(before):
            report.problems.append(f"{name}: {before!r} before its takeover is not a prefix")
        elif text == reference:
            report.embedded_identical += 1
        else:
            report.embedded_prefix += 1
    elif result.outcome() == "completed" and text == reference:
        report.embedded_identical += 1
    elif result.outcome() != "completed" and reference.startswith(text):
        report.embedded_prefix += 1
    else:
        report.problems.append(f"{name}: text {text!r} is not the reference {reference!r}")


def difference(stored: list[dict[str, Any]], result: StreamResult, replay: httpx.Response) -> str:
    """Where a replay departs from what the client saw (for the problem report)."""
    if replay.status_code != 200:
        return f"HTTP {replay.status_code} after {result.outcome()} ({len(result.events)} events)"
    seen = result.events
    at = next((i for i, (a, b) in enumerate(zip(stored, seen, strict=False)) if a != b), None)
    if at is None:
        at = min(len(stored), len(seen))
    stored_event = stored[at] if at < len(stored) else None
    seen_event = seen[at] if at < len(seen) else None
    return (
        f"{len(stored)} stored vs {len(seen)} seen, first difference at seq {at}: "
        f"stored {stored_event}, seen {seen_event}"
    )


def summary(report: ChaosReport) -> str:
    lines = [f"streams: {report.streams} in {report.seconds:.0f}s, "
             f"{report.connections} connections, {report.drops} client drops"]  # fmt: skip
    lines.append("faults: " + ", ".join(f"{k} ×{v}" for k, v in sorted(report.faults.items())))
    for kind, outcomes in sorted(report.outcomes_by_kind.items()):
        lines.append(
            f"{kind} outcomes: " + ", ".join(f"{k} ×{v}" for k, v in sorted(outcomes.items()))
        )
    lines.append(f"embedded identical to an uninterrupted run: {report.embedded_identical}, "
                 f"prefix-consistent (ended early, or continued differently): "
                 f"{report.embedded_prefix}; taken over: {report.embedded_continued}")  # fmt: skip
    lines += [f"PROBLEM: {p}" for p in report.problems]
    return "\n".join(lines)
