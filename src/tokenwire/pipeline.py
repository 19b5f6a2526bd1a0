"""The server's stage pipeline, innermost first (``StreamManager.stages``).

It sits above ``stages/`` and ``tools.py`` (it composes them from the settings and the
router), not among them, so the stages never import the tool loop that wraps them.

1. ``buffer_tool_calls``: tool-call deltas pass, arguments are validated, ``completed`` follows.
2. ``ToolLoop`` (only with ``--tools``): runs server-side tools and asks the model again; each
   step is the backend plus stage 1.
3. ``structured_output``: ``json.partial`` events and progressive JSON Schema validation.
4. ``Guards`` (only with ``--guard`` / ``--guard-predicate`` / registered guards): last, so it
   watches exactly the text the client gets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from tokenwire.cancel import CancelToken
from tokenwire.config import Settings
from tokenwire.events import Event
from tokenwire.requests import ChatRequest
from tokenwire.router import Router
from tokenwire.stages import Stage
from tokenwire.stages.guards import Guards
from tokenwire.stages.structured import structured_output
from tokenwire.stages.tools import buffer_tool_calls
from tokenwire.tools import ToolLoop, load_tools, registry

__all__ = ["build_stages"]


def build_stages(settings: Settings, router: Router) -> list[Stage]:
    inner: list[Stage] = [buffer_tool_calls]

    def open_step(request: ChatRequest, cancel: CancelToken) -> AsyncIterator[Event]:
        events = router.resolve(request.model).stream(request, cancel)
        for stage in inner:
            events = stage(events, request, cancel)
        return events

    stages: list[Stage] = list(inner)
    tools = load_tools(settings.tools)
    tools.merge(registry)
    if len(tools):
        stages.append(
            ToolLoop(
                tools, open_step, timeout=settings.tool_timeout, max_steps=settings.max_tool_steps
            )
        )
    stages.append(structured_output)
    guards = Guards.from_settings(settings.guard, settings.guard_predicate)
    if guards:
        stages.append(guards)
    return stages
