"""Real services for end-to-end tests: redis-server and nginx on free loopback ports.

Each is started in a temporary directory with its own config, waited for, and stopped (and
its directory removed) on exit. Both are Debian packages that `make test` installs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..conftest import ARTIFACTS, free_port

__all__ = [
    "Nginx",
    "RedisProcess",
    "Sentinel",
    "RedisServer",
    "nginx",
    "redis_process",
    "redis_sentinel",
    "redis_server",
    "require",
]

NGINX = "/usr/sbin/nginx"


def require(binary: str) -> str:
    """Path of a service binary; fails (never skips) when it is missing."""
    path = shutil.which(binary) or (binary if os.path.exists(binary) else None)
    if path is None:
        raise RuntimeError(f"{binary} is not installed: run scripts/install-system-deps.sh")
    return path


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port} after {timeout}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        """Run redis-cli against this server (for assertions on keys)."""
        out = subprocess.run(
            [require("redis-cli"), "-p", str(self.port), *args],
            check=True,
            capture_output=True,
            timeout=10,
        )
        return out.stdout.decode().strip()


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    binary = require("redis-server")
    directory = Path(tempfile.mkdtemp(prefix="tw-redis-"))
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--daemonize",
            "no",
        ],
        stdout=(directory / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_port(port, process)
        yield RedisServer(port, process, directory)
    finally:
        _stop(process)
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class RedisProcess:
    """A redis-server the test kills and restarts on the same port: ``durable`` keeps its
    data across a SIGKILL (AOF, ``appendfsync always``), otherwise it restarts empty.
    ``replica_of`` makes it a replica (Sentinel tests)."""

    port: int
    directory: Path
    durable: bool = False
    replica_of: int | None = None
    #: Extra ``redis-server`` options, e.g. ``{"min-replicas-to-write": 1}``.
    options: dict[str, object] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, empty: bool = False) -> None:
        if empty:
            for leftover in self.directory.glob("appendonly*"):
                shutil.rmtree(leftover, ignore_errors=True)
                leftover.unlink(missing_ok=True)
        options = {"port": self.port, "bind": "127.0.0.1", "save": "",
                   "appendonly": "yes" if self.durable else "no", "appendfsync": "always",
                   "dir": self.directory, "daemonize": "no", **self.options}  # fmt: skip
        command = [require("redis-server")]
        for name, value in options.items():
            command += [f"--{name}", str(value)]
        if self.replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.process = subprocess.Popen(
            command,
            stdout=(self.directory / f"redis-{self.port}.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        _wait_for_port(self.port, self.process)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [require("redis-cli"), "-p", str(self.port), *args],
            check=True,
            capture_output=True,
            timeout=10,
        )
        return out.stdout.decode().strip()


@contextmanager
def redis_process(
    *, durable: bool = False, replica_of: int | None = None, **options: object
) -> Iterator[RedisProcess]:
    directory = Path(tempfile.mkdtemp(prefix="tw-redis-"))
    redis = RedisProcess(free_port(), directory, durable, replica_of, dict(options))
    redis.start()
    try:
        yield redis
    finally:
        if redis.process is not None:
            _stop(redis.process)
        shutil.rmtree(directory, ignore_errors=True)


_SENTINEL_CONF = """\
port {port}
bind 127.0.0.1
daemonize no
dir {dir}
sentinel monitor {master} 127.0.0.1 {master_port} 1
sentinel down-after-milliseconds {master} {down_after}
sentinel failover-timeout {master} 4000
sentinel parallel-syncs {master} 1
"""


@dataclass
class Sentinel:
    """A master, a replica and one redis-sentinel watching them (quorum 1, the master
    declared down after ``down_after_ms``, 1 s by default)."""

    master: RedisProcess
    replica: RedisProcess
    port: int
    process: subprocess.Popen[bytes]
    name: str = "twmaster"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}/0"

    def master_port(self) -> int:
        out = subprocess.run(
            [require("redis-cli"), "-p", str(self.port), "SENTINEL", "get-master-addr-by-name",
             self.name], check=True, capture_output=True, timeout=10,
        )  # fmt: skip
        return int(out.stdout.decode().split()[1])

    def wait_for_failover(self, away_from: int, timeout: float = 30.0) -> int:
        """The new master's port, once the sentinel has promoted one other than ``away_from``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.master_port()
            if port != away_from:
                return port
            time.sleep(0.1)
        raise TimeoutError("the sentinel did not fail over")


@contextmanager
def redis_sentinel(
    *, durable: bool = False, down_after_ms: int = 1000, **options: object
) -> Iterator[Sentinel]:
    with (
        redis_process(durable=durable, **options) as master,
        redis_process(durable=durable, replica_of=master.port, **options) as replica,
    ):
        directory = Path(tempfile.mkdtemp(prefix="tw-sentinel-"))
        port = free_port()
        conf = directory / "sentinel.conf"
        conf.write_text(
            _SENTINEL_CONF.format(
                port=port,
                dir=directory,
                master="twmaster",
                master_port=master.port,
                down_after=down_after_ms,
            )
        )
        process = subprocess.Popen(
            [require("redis-sentinel"), str(conf)],
            stdout=(directory / "sentinel.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_port(port, process)
            sentinel = Sentinel(master, replica, port, process)
            deadline = time.monotonic() + 15
            while "slaves=1" not in subprocess.run(
                [require("redis-cli"), "-p", str(port), "INFO", "sentinel"],
                capture_output=True, timeout=10,
            ).stdout.decode():  # fmt: skip
                assert time.monotonic() < deadline, "the sentinel never saw the replica"
                time.sleep(0.1)
            yield sentinel
        finally:
            _stop(process)
            # Kept for diagnosis: which failovers the sentinel decided, and when.
            with contextlib.suppress(OSError):
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shutil.copy(directory / "sentinel.log", ARTIFACTS / f"sentinel-{port}.log")
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Nginx:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        return (self.directory / "error.log").read_text(errors="replace")


_NGINX_CONF = """\
{user}
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    upstream tokenwire {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        # proxy_buffering stays at nginx's default (on): X-Accel-Buffering must defeat it.
        location / {{
            proxy_pass http://tokenwire;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


@contextmanager
def nginx(upstream_ports: list[int]) -> Iterator[Nginx]:
    """nginx round-robin over ``upstream_ports`` with default proxy buffering."""
    binary = require(NGINX)
    directory = Path(tempfile.mkdtemp(prefix="tw-nginx-"))
    port = free_port()
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstream_ports
    )
    conf = _NGINX_CONF.format(
        # As root the workers would drop to nobody, who cannot write the temp dirs.
        user="user root;" if os.geteuid() == 0 else "",
        dir=directory,
        servers=servers,
        port=port,
    )
    (directory / "nginx.conf").write_text(conf)
    process = subprocess.Popen(
        [binary, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-e", "stderr"],
        stdout=(directory / "stdout.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_port(port, process)
        yield Nginx(port, process, directory)
    finally:
        _stop(process)
        shutil.rmtree(directory, ignore_errors=True)
