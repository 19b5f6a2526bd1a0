"""Structured output, validated while it streams.

For ``response_format`` ``json_object`` / ``json_schema`` the stage feeds every text delta once
to ``PartialJsonParser`` and emits ``json.partial`` events (the partial value and the JSON
path being written) as the value grows; the text deltas still stream. The known prefix is
checked against the JSON Schema as it arrives (``ProgressiveValidator``):

- type, as soon as a value's first character shows it (``{`` object, ``"`` string …);
- ``enum``/``const``: a string must stay a prefix of an allowed value, other scalars are
  checked when complete;
- ``additionalProperties``/``properties``/``patternProperties`` when a key is complete,
  ``maxProperties``/``maxItems``/``maxLength`` as soon as they are exceeded;
- ``required``, ``minItems``, ``minLength``, ``pattern``, bounds… when the value completes;
- nested objects and arrays (``items``, ``prefixItems``), local ``$ref``s. Subschemas with
  combinators (``anyOf``, ``oneOf``, ``allOf``, ``not``, ``if``) are checked as a whole
  when their value completes (plus their branch types at its first character).

A violation stops the backend at once (the stage closes it: decoding ends before the error is
journaled) and raises ``OutputValidationError`` naming the JSON path; the stream manager
journals it as ``stream.failed``. The text delta that broke the schema is not passed on.
At the end the whole value is validated once more with ``jsonschema`` (the backstop for
keywords checked only as a whole).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from jsonschema.validators import validator_for

from tokenwire.cancel import CancelToken
from tokenwire.errors import InvalidRequest, OutputValidationError
from tokenwire.events import Event, JsonPartial, StreamCompleted, TextDelta, aclose
from tokenwire.jsonstream import JsonStreamError, PartialJsonParser, format_path
from tokenwire.requests import ChatRequest

__all__ = [
    "JSON_OBJECT_SCHEMA",
    "ProgressiveValidator",
    "SchemaStream",
    "aclose",
    "compile_schema",
    "structured_output",
]

#: ``json_object`` mode: any JSON object (what OpenAI's JSON mode promises).
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}

_COMBINATORS = frozenset(
    (
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "if",
        "then",
        "else",
        "dependentSchemas",
        "unevaluatedProperties",
        "unevaluatedItems",
        "$dynamicRef",
        "$recursiveRef",
    )
)
#: Keywords about a container itself, checked when it closes (children were checked already).
_SHALLOW = frozenset(
    (
        "type",
        "required",
        "minProperties",
        "maxProperties",
        "minItems",
        "maxItems",
        "uniqueItems",
        "enum",
        "const",
        "dependentRequired",
        "propertyNames",
        "contains",
        "minContains",
        "maxContains",
    )
)
#: Finish reasons after which the JSON value may be incomplete without being an error.
_UNFINISHED = frozenset(("length", "tool_calls", "content_filter"))
_JSON_KIND = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    type(None): "null",
    int: "number",
    float: "number",
}


def compile_schema(schema: dict[str, Any], *, param: str) -> jsonschema.protocols.Validator:
    """A jsonschema validator for ``schema``; an invalid schema is the caller's 400."""
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(f"Invalid JSON schema: {exc.message}", param=param) from exc
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


@dataclass(slots=True)
class _Frame:
    schema: dict[str, Any] | None  # None: anything goes (progressively)
    kind: str
    segments: list[str | int]
    opaque: bool = False  # validated as a whole when it ends
    count: int = 0  # properties or items seen
    length: int = 0  # string length so far
    prefix: str | None = None  # string so far, kept only for enum/const checks
    candidates: list[str] = field(default_factory=list)


class ProgressiveValidator:
    """A ``JsonListener`` that checks the document against a schema as it is parsed."""

    def __init__(self, validator: jsonschema.protocols.Validator, *, label: str = "output") -> None:
        self.validator = validator
        self.label = label
        self.root: Any = validator.schema
        self._stack: list[_Frame] = []
        self._validators: dict[int, jsonschema.protocols.Validator] = {}
        self._shallow: dict[int, dict[str, Any]] = {}

    # -- schema navigation -----------------------------------------------------------------

    def _resolve(self, schema: Any) -> tuple[dict[str, Any] | None, bool]:
        """(schema with local $refs followed, opaque?). ``False`` raises via the caller."""
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and seen < 32:
            ref = schema["$ref"]
            others = set(schema) - {"$ref", "description", "title", "$comment", "default"}
            if not isinstance(ref, str) or not ref.startswith("#") or others:
                return schema, True
            target: Any = self.root
            for part in ref[1:].split("/")[1:] if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    return schema, True
            schema = target
            seen += 1
        if schema is True or schema is None or schema == {}:
            return None, False
        if not isinstance(schema, dict):
            return None, False
        return schema, bool(_COMBINATORS & schema.keys())

    def _child_schema(self, parent: _Frame, key: str | int) -> Any:
        schema = parent.schema
        if schema is None or parent.opaque:
            return None
        if isinstance(key, str):
            properties = schema.get("properties") or {}
            if key in properties:
                return properties[key]
            for pattern, sub in (schema.get("patternProperties") or {}).items():
                if re.search(pattern, key):
                    return sub
            return schema.get("additionalProperties", True)
        prefix = schema.get("prefixItems") or []
        if key < len(prefix):
            return prefix[key]
        return schema.get("items", True)

    def _fail(self, segments: list[str | int], message: str) -> OutputValidationError:
        path = format_path(segments)
        return OutputValidationError(
            f"The {self.label} violates its JSON schema at {path}: {message}", path=path
        )

    # -- listener --------------------------------------------------------------------------

    def begin(self, kind: str, key: str | int | None) -> None:
        if not self._stack:
            raw: Any = self.root
            segments: list[str | int] = []
        else:
            parent = self._stack[-1]
            segments = [*parent.segments, key] if key is not None else list(parent.segments)
            raw = self._child_schema(parent, key) if key is not None else None
            if parent.kind == "array" and parent.schema is not None and not parent.opaque:
                parent.count += 1
                limit = parent.schema.get("maxItems")
                if isinstance(limit, int) and parent.count > limit:
                    raise self._fail(segments, f"more than {limit} items")
        if raw is False:
            raise self._fail(segments, "no value is allowed here")
        schema, opaque = self._resolve(raw)
        if schema is not None:
            self._check_kind(schema, kind, segments)
        frame = _Frame(schema, kind, segments, opaque)
        if kind == "string" and schema is not None and not opaque:
            candidates = _string_candidates(schema)
            if candidates is not None:
                frame.prefix = ""
                frame.candidates = candidates
        self._stack.append(frame)

    def _check_kind(self, schema: dict[str, Any], kind: str, segments: list[str | int]) -> None:
        allowed = _allowed_kinds(schema)
        if allowed is not None and kind not in allowed:
            expected = " or ".join(sorted(allowed))
            raise self._fail(segments, f"expected {expected}, got {_article(kind)}")

    def key(self, name: str) -> None:
        frame = self._stack[-1]
        schema = frame.schema
        if schema is None or frame.opaque:
            return
        frame.count += 1
        segments = [*frame.segments, name]
        if self._child_schema(frame, name) is False:
            raise self._fail(segments, f"additional property {name!r} is not allowed")
        limit = schema.get("maxProperties")
        if isinstance(limit, int) and frame.count > limit:
            raise self._fail(segments, f"more than {limit} properties")

    def chunk(self, text: str) -> None:
        frame = self._stack[-1]
        schema = frame.schema
        if schema is None or frame.opaque:
            return
        frame.length += len(text)
        limit = schema.get("maxLength")
        if isinstance(limit, int) and frame.length > limit:
            raise self._fail(frame.segments, f"string longer than {limit} characters")
        if frame.prefix is not None:
            frame.prefix += text
            prefix = frame.prefix
            if not any(c.startswith(prefix) for c in frame.candidates):
                allowed = ", ".join(repr(c) for c in frame.candidates[:5])
                raise self._fail(
                    frame.segments, f"{prefix!r}… cannot become one of the allowed values {allowed}"
                )

    def end(self, value: Any) -> None:
        frame = self._stack.pop()
        schema = frame.schema
        if schema is None:
            return
        if frame.opaque or frame.kind not in ("object", "array"):
            self._check(value, schema, frame.segments)
            return
        shallow = self._shallow.get(id(schema))
        if shallow is None:
            shallow = {k: v for k, v in schema.items() if k in _SHALLOW}
            self._shallow[id(schema)] = shallow
        if shallow:
            self._check(value, shallow, frame.segments)

    def _check(self, value: Any, schema: dict[str, Any], segments: list[str | int]) -> None:
        validator = self._validators.get(id(schema))
        if validator is None:
            validator = self.validator.evolve(schema=schema)
            self._validators[id(schema)] = validator
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            raise self._fail([*segments, *error.absolute_path], error.message)


def _allowed_kinds(schema: dict[str, Any]) -> set[str] | None:
    types = schema.get("type")
    if isinstance(types, str):
        types = [types]
    if isinstance(types, list):
        return {"number" if t == "integer" else t for t in types}
    for keyword in ("anyOf", "oneOf"):
        branches = schema.get(keyword)
        if isinstance(branches, list) and branches:
            kinds: set[str] = set()
            for branch in branches:
                sub = _allowed_kinds(branch) if isinstance(branch, dict) else None
                if sub is None:
                    return None
                kinds |= sub
            return kinds
    values = schema["enum"] if isinstance(schema.get("enum"), list) else None
    if "const" in schema:
        values = [schema["const"]]
    if values is not None:
        return {_JSON_KIND.get(type(v), "unknown") for v in values}
    return None


def _string_candidates(schema: dict[str, Any]) -> list[str] | None:
    if "const" in schema:
        return [schema["const"]] if isinstance(schema["const"], str) else []
    enum = schema.get("enum")
    if isinstance(enum, list):
        return [v for v in enum if isinstance(v, str)]
    return None


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


class SchemaStream:
    """A parser plus a progressive validator: feed text, read the partial value, close."""

    def __init__(self, validator: jsonschema.protocols.Validator, *, label: str = "output") -> None:
        self.validator = validator
        self.label = label
        self.checker = ProgressiveValidator(validator, label=label)
        self.parser = PartialJsonParser(self.checker)

    def feed(self, text: str) -> None:
        try:
            self.parser.feed(text)
        except JsonStreamError as exc:
            raise OutputValidationError(
                f"The {self.label} is not valid JSON at {exc.path}: {exc.reason}",
                path=exc.path,
                code="invalid_json",
            ) from exc

    def close(self) -> Any:
        """The final value, validated as a whole; raise if incomplete or invalid."""
        try:
            value = self.parser.close()
        except JsonStreamError as exc:
            raise OutputValidationError(
                f"The {self.label} ended before its JSON value was complete ({exc.path}).",
                path=exc.path,
                code="incomplete_json",
            ) from exc
        error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        if error is not None:
            path = error.json_path
            raise OutputValidationError(
                f"The {self.label} violates its JSON schema at {path}: {error.message}", path=path
            )
        return value


def structured_output(
    events: AsyncIterator[Event], request: ChatRequest, cancel: CancelToken
) -> AsyncIterator[Event]:
    """The stage: validated ``json.partial`` events for JSON response formats."""
    fmt = request.response_format
    if fmt.type == "text":
        return events
    schema: dict[str, Any] = (
        fmt.schema if fmt.type == "json_schema" and fmt.schema is not None else JSON_OBJECT_SCHEMA
    )
    return _structured(events, schema, request.prefill)


async def _structured(
    events: AsyncIterator[Event], schema: dict[str, Any], prefill: str
) -> AsyncIterator[Event]:
    try:
        stream = SchemaStream(compile_schema(schema, param="response_format.json_schema.schema"))
        parser = stream.parser
        if prefill:  # a continued answer (takeover): its start already streamed
            stream.feed(prefill)
        version = parser.version if parser.has_value else -1
        async for event in events:
            if isinstance(event, TextDelta):
                stream.feed(event.text)  # raises at the first violation: the delta stays out
                yield event
                if parser.has_value and parser.version != version:
                    version = parser.version
                    yield JsonPartial(value=parser.value, path=parser.path)
            elif isinstance(event, StreamCompleted):
                # Cut off by max_tokens (the client sees "length" and the partial value), or
                # no answer at all (a tool call, a content filter); otherwise the value must
                # be complete and valid.
                if event.finish_reason not in _UNFINISHED:
                    stream.close()
                yield event
            else:
                yield event
    finally:
        # Stop the backend now (a no-op after a normal end): decoding ends with the stage.
        await aclose(events)
