"""An incremental JSON parser for streamed output: each delta is consumed once.

``PartialJsonParser.feed(delta)`` advances a state machine over the new characters only, so
parsing a whole streamed document is linear in its length, however small the deltas. jiter,
pydantic's ``allow_partial`` and partial-json-parser re-parse the whole buffer on every delta,
which is quadratic in the output (see ``benchmarks/partial_json.py``).

Promises:
- the value returned by ``close()`` equals ``json.loads`` of the concatenated deltas, for any
  split of any valid document (strict JSON: no NaN/Infinity, no control characters inside
  strings, surrogate pairs combined as ``json.loads`` does);
- ``value`` is, after every feed, consistent with the final value: objects carry a subset of
  the final keys (in order), arrays a prefix of the final items, the string being written a
  prefix of its final text, and every other scalar its final value. Numbers and
  ``true``/``false``/``null`` appear only once complete; a key appears once its value starts;
- invalid input raises ``JsonStreamError`` at the first character that no valid document
  could continue with, carrying its absolute ``position`` and the JSON ``path`` there.

Reading ``value`` costs the width of the containers still open plus the length of the open
string: closed containers are never mutated again, so snapshots share them (a snapshot must
not be mutated by the caller). A ``listener`` receives nested ``begin``/``end`` calls per
value, ``key`` per object key and ``chunk`` per piece of string value, which is how the
schema checks in ``stages/structured.py`` follow the document without re-reading it.

Duplicate keys keep the last value, as ``json.loads`` does (a partial value may then show the
first one for a while).
"""

from __future__ import annotations

import re
from typing import Any, NoReturn, Protocol

__all__ = ["JsonListener", "JsonStreamError", "PartialJsonParser", "format_path"]

_STR_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_DIGITS = re.compile(r"[0-9]+")
_WS_RUN = re.compile(r"[ \t\n\r]+")
_WS = " \t\n\r"
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Parser states.
_VALUE = 0  # a value must come (start, after ':' or after ',' in an array)
_VALUE_OR_CLOSE = 1  # just after '['
_KEY = 2  # after ',' in an object: a key must come
_KEY_OR_CLOSE = 3  # just after '{'
_COLON = 4
_AFTER = 5  # after a value inside a container: ',' or the closing bracket
_STRING = 6
_NUMBER = 7
_LITERAL = 8
_END = 9  # the top-level value is complete: only whitespace may follow

# Number sub-states (a DFA over -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?).
_N_SIGN, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(8)
_N_ACCEPTING = frozenset((_N_ZERO, _N_INT, _N_FRAC, _N_EXP))

_LITERALS = {"t": ("true", True), "f": ("false", False), "n": ("null", None)}
_KINDS = {"t": "boolean", "f": "boolean", "n": "null"}

_MISSING: Any = object()


class JsonStreamError(ValueError):
    """Invalid JSON: ``position`` is the absolute index of the first bad character."""

    def __init__(self, message: str, *, position: int, path: str) -> None:
        super().__init__(f"{message} at character {position} ({path})")
        self.reason = message
        self.position = position
        self.path = path


class JsonListener(Protocol):
    """Follows the document's structure as it is parsed (all calls nest properly)."""

    def begin(self, kind: str, key: str | int | None) -> None:
        """A value of ``kind`` (object, array, string, number, boolean, null) starts at
        ``key`` of the enclosing container (an index in arrays, None at the top)."""

    def key(self, name: str) -> None:
        """An object key is complete (its value has not started yet)."""

    def chunk(self, text: str) -> None:
        """More characters of the string value that began last."""

    def end(self, value: Any) -> None:
        """The value that began last is complete."""


def format_path(segments: list[str | int]) -> str:
    """``["a", 0, "b c"]`` -> ``$.a[0]['b c']`` (JSONPath, as jsonschema prints it)."""
    parts = ["$"]
    for segment in segments:
        if isinstance(segment, int):
            parts.append(f"[{segment}]")
        elif _IDENT.match(segment):
            parts.append(f".{segment}")
        else:
            escaped = segment.replace("\\", "\\\\").replace("'", "\\'")
            parts.append(f"['{escaped}']")
    return "".join(parts)


class PartialJsonParser:
    """Feed text deltas; read ``value`` (partial) and ``path`` at any time; ``close()``."""

    def __init__(self, listener: JsonListener | None = None) -> None:
        self.listener = listener
        #: Characters consumed so far.
        self.position = 0
        self._state = _VALUE
        self._containers: list[dict[str, Any] | list[Any]] = []
        #: Per open container: the key being written (objects) or None (arrays).
        self._keys: list[str | None] = []
        self._root: Any = _MISSING
        # The string being read.
        self._chunks: list[str] = []
        self._is_key = False
        self._escape = 0  # 0: none, 1: after '\', 2..5: reading \u hex digits
        self._hex = ""
        self._high: int | None = None  # a high surrogate waiting for its pair
        # The number or literal being read.
        self._number: list[str] = []
        self._nstate = _N_SIGN
        self._literal = ""
        self._literal_value: Any = None
        self._literal_at = 0
        # Snapshot cache: bumped whenever the partial value changes.
        self._version = 0
        self._snap_version = -1
        self._snap: Any = _MISSING

    # -- reading -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """The top-level value is complete (only whitespace may follow)."""
        return self._state == _END

    @property
    def version(self) -> int:
        """Changes whenever ``value`` may have changed (cheap change detection)."""
        return self._version

    @property
    def has_value(self) -> bool:
        return self._root is not _MISSING or self._top_string_open()

    def _top_string_open(self) -> bool:
        return not self._containers and self._state == _STRING and not self._is_key

    @property
    def value(self) -> Any:
        """The partial value so far (None before any value starts). Do not mutate it."""
        if self._snap_version != self._version:
            self._snap = self._snapshot()
            self._snap_version = self._version
        return None if self._snap is _MISSING else self._snap

    def _snapshot(self) -> Any:
        leaf: Any = _MISSING
        if self._state == _STRING and not self._is_key:
            leaf = "".join(self._chunks)
        if not self._containers:
            return leaf if leaf is not _MISSING else self._root
        child: Any = leaf
        for depth in range(len(self._containers) - 1, -1, -1):
            container = self._containers[depth]
            copy: Any = container.copy()
            innermost = depth == len(self._containers) - 1
            if isinstance(copy, list):
                if innermost:
                    if child is not _MISSING:
                        copy.append(child)
                else:
                    copy[-1] = child
            else:
                key = self._keys[depth]
                if child is not _MISSING and key is not None:
                    copy[key] = child
            child = copy
        return child

    @property
    def segments(self) -> list[str | int]:
        """Path of the value being written, as keys and indexes."""
        out: list[str | int] = []
        last = len(self._containers) - 1
        # Inside a scalar, or where a value must come next: the path names that value.
        in_scalar = self._state in (_NUMBER, _LITERAL, _VALUE, _VALUE_OR_CLOSE) or (
            self._state == _STRING and not self._is_key
        )
        for depth, container in enumerate(self._containers):
            if isinstance(container, list):
                if depth < last:
                    out.append(len(container) - 1)
                elif in_scalar:
                    out.append(len(container))
            else:
                key = self._keys[depth]
                if key is not None and (depth < last or in_scalar):
                    out.append(key)
        return out

    @property
    def path(self) -> str:
        return format_path(self.segments)

    # -- feeding -------------------------------------------------------------------------

    def feed(self, text: str) -> None:
        """Consume ``text``; raise ``JsonStreamError`` at the first invalid character."""
        i = 0
        n = len(text)
        while i < n:
            state = self._state
            if state == _STRING:
                i = self._read_string(text, i, n)
                continue
            if state == _NUMBER:
                i = self._read_number(text, i, n)
                continue
            c = text[i]
            if c in _WS:
                match = _WS_RUN.match(text, i)
                i = match.end() if match else i + 1
                continue
            i = self._punctuate(text, i, c, state)
        self.position += n

    def _punctuate(self, text: str, i: int, c: str, state: int) -> int:
        """One character outside strings and numbers: a value's start, a key's quote, a
        separator, a closing bracket or a literal's next letter. Returns the next index."""
        if state == _AFTER:
            top = self._containers[-1]
            if c == ",":
                self._state = _KEY if isinstance(top, dict) else _VALUE
            elif (c == "}" and isinstance(top, dict)) or (c == "]" and isinstance(top, list)):
                self._close_container()
            else:
                expected = "',' or '}'" if isinstance(top, dict) else "',' or ']'"
                self._fail(f"expected {expected}, got {c!r}", i)
            return i + 1
        if state in (_VALUE, _VALUE_OR_CLOSE):
            if c == "]" and state == _VALUE_OR_CLOSE:
                self._close_container()
                return i + 1
            return self._begin_value(text, i, c)
        if state in (_KEY, _KEY_OR_CLOSE):
            if c == '"':
                self._state = _STRING
                self._is_key = True
                self._chunks = []
            elif c == "}" and state == _KEY_OR_CLOSE:
                self._close_container()
            else:
                self._fail(f"expected an object key, got {c!r}", i)
            return i + 1
        if state == _COLON:
            if c != ":":
                self._fail(f"expected ':', got {c!r}", i)
            self._state = _VALUE
            return i + 1
        if state == _LITERAL:
            return self._literal_char(i, c)
        self._fail(f"extra data after the JSON value: {c!r}", i)  # _END

    def _literal_char(self, i: int, c: str) -> int:
        expected = self._literal[self._literal_at]
        if c != expected:
            self._fail(f"invalid literal: expected {expected!r}, got {c!r}", i)
        self._literal_at += 1
        if self._literal_at == len(self._literal):
            self._complete_scalar(self._literal_value)
        return i + 1

    def close(self) -> Any:
        """End of input: return the final value, or raise if the document is incomplete."""
        if self._state == _NUMBER and self._nstate in _N_ACCEPTING:
            self._finish_number()
        if self._state != _END:
            raise JsonStreamError(
                "unexpected end of the JSON document", position=self.position, path=self.path
            )
        return self._root

    # -- internals -----------------------------------------------------------------------

    def _fail(self, message: str, index: int) -> NoReturn:
        raise JsonStreamError(message, position=self.position + index, path=self.path)

    def _child_key(self) -> str | int | None:
        if not self._containers:
            return None
        top = self._containers[-1]
        return len(top) if isinstance(top, list) else self._keys[-1]

    def _attach(self, value: Any) -> None:
        if not self._containers:
            self._root = value
            return
        top = self._containers[-1]
        if isinstance(top, list):
            top.append(value)
        else:
            top[self._keys[-1]] = value  # type: ignore[index]

    def _begin_value(self, text: str, i: int, c: str) -> int:
        listener = self.listener
        if c == '"':
            if listener is not None:
                listener.begin("string", self._child_key())
            self._state = _STRING
            self._is_key = False
            self._chunks = []
            self._version += 1
            return i + 1
        if c == "{" or c == "[":
            container: dict[str, Any] | list[Any] = {} if c == "{" else []
            if listener is not None:
                listener.begin("object" if c == "{" else "array", self._child_key())
            self._attach(container)
            self._containers.append(container)
            self._keys.append(None)
            self._state = _KEY_OR_CLOSE if c == "{" else _VALUE_OR_CLOSE
            self._version += 1
            return i + 1
        if c == "-" or "0" <= c <= "9":
            if listener is not None:
                listener.begin("number", self._child_key())
            self._state = _NUMBER
            self._number = []
            self._nstate = _N_SIGN  # re-read this character in the number DFA
            return i
        literal = _LITERALS.get(c)
        if literal is not None:
            if listener is not None:
                listener.begin(_KINDS[c], self._child_key())
            self._state = _LITERAL
            self._literal, self._literal_value = literal
            self._literal_at = 1
            return i + 1
        self._fail(f"expected a JSON value, got {c!r}", i)

    def _complete_scalar(self, value: Any, *, changed: bool = True) -> None:
        self._attach(value)
        if changed:
            self._version += 1
        if self.listener is not None:
            self.listener.end(value)
        self._state = _AFTER if self._containers else _END

    def _close_container(self) -> None:
        container = self._containers.pop()
        self._keys.pop()
        # Closing does not change the value: snapshots already showed the container.
        if self.listener is not None:
            self.listener.end(container)
        self._state = _AFTER if self._containers else _END

    # strings

    def _read_string(self, text: str, i: int, n: int) -> int:
        chunks = self._chunks
        listener = None if self._is_key else self.listener
        while i < n:
            if self._escape:
                i = self._read_escape(text, i, n)
                continue
            match = _STR_RUN.match(text, i)
            if match is not None:
                run = match.group()
                if self._high is not None:
                    self._flush_high()
                chunks.append(run)
                if listener is not None:
                    listener.chunk(run)
                i = match.end()
                if not self._is_key:
                    self._version += 1
                continue
            c = text[i]
            if c == '"':
                if self._high is not None:
                    self._flush_high()
                self._end_string()
                return i + 1
            if c == "\\":
                self._escape = 1
                i += 1
                continue
            self._fail(f"unescaped control character {c!r} in a string", i)
        return i

    def _read_escape(self, text: str, i: int, n: int) -> int:
        c = text[i]
        if self._escape == 1:
            if c == "u":
                self._escape = 2
                self._hex = ""
                return i + 1
            char = _ESCAPES.get(c)
            if char is None:
                self._fail(f"invalid escape '\\{c}' in a string", i)
            self._escape = 0
            if self._high is not None:
                self._flush_high()
            self._append_char(char)
            return i + 1
        if c not in _HEX:
            self._fail(f"invalid \\u escape: {c!r} is not a hex digit", i)
        self._hex += c
        if len(self._hex) < 4:
            return i + 1
        self._escape = 0
        code = int(self._hex, 16)
        if self._high is not None:
            if 0xDC00 <= code <= 0xDFFF:
                combined = 0x10000 + ((self._high - 0xD800) << 10) + (code - 0xDC00)
                self._high = None
                self._append_char(chr(combined))
                return i + 1
            self._flush_high()
        if 0xD800 <= code <= 0xDBFF:
            self._high = code  # held back: the next escape may complete the pair
        else:
            self._append_char(chr(code))
        return i + 1

    def _flush_high(self) -> None:
        assert self._high is not None
        high, self._high = self._high, None
        self._append_char(chr(high))

    def _append_char(self, char: str) -> None:
        self._chunks.append(char)
        if not self._is_key:
            self._version += 1
            if self.listener is not None:
                self.listener.chunk(char)

    def _end_string(self) -> None:
        text = "".join(self._chunks)
        self._chunks = []
        if self._is_key:
            self._keys[-1] = text
            self._state = _COLON
            if self.listener is not None:
                self.listener.key(text)
            return
        self._complete_scalar(text, changed=False)  # the partial string was already shown

    # numbers

    def _read_number(self, text: str, i: int, n: int) -> int:
        number = self._number
        while i < n:
            c = text[i]
            s = self._nstate
            if "0" <= c <= "9":
                if s == _N_ZERO:
                    self._fail("leading zeros are not allowed in numbers", i)
                match = _DIGITS.match(text, i)
                assert match is not None
                run = match.group()
                if s == _N_SIGN:
                    if run[0] == "0":
                        if len(run) > 1:
                            self._fail("leading zeros are not allowed in numbers", i + 1)
                        self._nstate = _N_ZERO
                    else:
                        self._nstate = _N_INT
                elif s == _N_DOT:
                    self._nstate = _N_FRAC
                elif s in (_N_E, _N_ESIGN):
                    self._nstate = _N_EXP
                number.append(run)
                i = match.end()
                continue
            if c == "-" and s == _N_SIGN and not number:
                number.append(c)
                i += 1
                continue
            if c == "." and s in (_N_ZERO, _N_INT):
                number.append(c)
                self._nstate = _N_DOT
                i += 1
                continue
            if c in "eE" and s in (_N_ZERO, _N_INT, _N_FRAC):
                number.append(c)
                self._nstate = _N_E
                i += 1
                continue
            if c in "+-" and s == _N_E:
                number.append(c)
                self._nstate = _N_ESIGN
                i += 1
                continue
            if s in _N_ACCEPTING:
                self._finish_number()
                return i  # the terminator is read in the next state
            self._fail(f"invalid number: unexpected {c!r}", i)
        return i

    def _finish_number(self) -> None:
        raw = "".join(self._number)
        self._number = []
        is_float = "." in raw or "e" in raw or "E" in raw
        self._complete_scalar(float(raw) if is_float else int(raw))
