#!/usr/bin/env python3
"""Generate the sync client from the async one (httpcore's ``scripts/unasync.py`` approach).

``src/tokenwire/client/_async.py`` is the one hand-written side; this script writes
``_sync.py`` from it by dropping ``async``/``await`` and renaming what has a sync twin, then
formats the result with ruff so that it passes ``ruff format --check`` as it is.

    python scripts/unasync.py           # rewrite _sync.py
    python scripts/unasync.py --check   # exit 1 if _sync.py is not what this would write

``make lint`` runs ``--check``; ``make unasync`` rewrites.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "src" / "tokenwire" / "client"
SOURCE = CLIENT / "_async.py"
TARGET = CLIENT / "_sync.py"

SYNC_DOCSTRING = '''"""The sync client: ``Client``, ``Chat``, ``Streams`` and ``ChatStream``.

GENERATED from ``_async.py`` by ``scripts/unasync.py``: do not edit; edit ``_async.py`` and
run ``make unasync``. ``make lint`` fails when this file is stale.

    client = tokenwire.Client("http://127.0.0.1:8000")
    with client.chat.stream(messages=[{"role": "user", "content": "Hi"}]) as s:
        for piece in s.text_stream():
            print(piece, end="", flush=True)
    print(s.final().finish_reason, s.metrics.summary())
"""'''

#: (pattern, replacement), applied in order to every line after the module docstring.
RULES: list[tuple[str, str]] = [
    (r"\bAsyncGenerator\[(\w+), None\]", r"Generator[\1, None, None]"),
    (r"(?<![A-Za-z0-9])Async(?=[A-Z])", ""),  # AsyncClient -> Client, _AsyncX -> _X …
    (r"\basync (def|with|for)\b", r"\1"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\b__aiter__\b", "__iter__"),
    (r"\baclose\b", "close"),
    (r"\baread\b", "read"),
    (r"\baiter_bytes\b", "iter_bytes"),
    (r"\banext\b", "next"),
    (r"\bStopAsyncIteration\b", "StopIteration"),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"^import asyncio$", "import time"),
    (r"\basynchronous\b", "synchronous"),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in RULES]


def unasync_line(line: str) -> str:
    for pattern, replacement in _COMPILED:
        line = pattern.sub(replacement, line)
    return line


def generate(source: str) -> str:
    """The sync module for ``source`` (the async module's text), formatted."""
    match = re.match(r'(?s)\s*""".*?"""\n', source)
    if match is None:
        raise SystemExit(f"{SOURCE}: expected a module docstring first")
    body = source[match.end() :]
    lines = [unasync_line(line) for line in body.splitlines()]
    text = SYNC_DOCSTRING + "\n" + "\n".join(lines) + "\n"
    return _ruff_format(text)


def _ruff_format(text: str) -> str:
    # Shorter lines may now fit on one: ruff decides, so the output is what `ruff format`
    # keeps. ruff is a dev dependency; call it through this interpreter's environment.
    ruff = Path(sys.executable).with_name("ruff")
    command = [str(ruff)] if ruff.exists() else [sys.executable, "-m", "ruff"]
    for args in (
        ["check", "--fix-only", "--select", "I,F401", "--quiet"],
        ["format", "--quiet"],
    ):
        result = subprocess.run(
            [*command, *args, "--stdin-filename", str(TARGET), "-"],
            input=text,
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(f"ruff {args[0]} failed on the generated code:\n{result.stderr}")
        text = result.stdout
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the generated file is stale")
    args = parser.parse_args(argv)
    expected = generate(SOURCE.read_text())
    current = TARGET.read_text() if TARGET.exists() else ""
    if args.check:
        if current == expected:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=f"{TARGET.relative_to(ROOT)} (committed)",
            tofile=f"{TARGET.relative_to(ROOT)} (generated from {SOURCE.name})",
        )
        sys.stderr.writelines(diff)
        print(
            f"{TARGET.relative_to(ROOT)} is stale: run `make unasync` (scripts/unasync.py)",
            file=sys.stderr,
        )
        return 1
    if current != expected:
        TARGET.write_text(expected)
        print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
