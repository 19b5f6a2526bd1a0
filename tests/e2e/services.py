"""Real services for end-to-end tests: redis-server and nginx on free loopback ports.

Each is started in a temporary directory with its own config, waited for, and stopped (and
its directory removed) on exit. Both are Debian packages that `make test` installs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..conftest import free_port

__all__ = ["Nginx", "RedisServer", "nginx", "redis_server", "require"]

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
