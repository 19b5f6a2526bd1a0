"""Server-side tools for the tests (loaded with ``--tools tool_fixtures:tools``)."""

from __future__ import annotations

import time

from tokenwire.tools import ToolRegistry

tools = ToolRegistry()


@tools.tool
def get_weather(city: str) -> dict[str, object]:
    """Current weather for a city."""
    time.sleep(1.3)  # long enough for an "elapsed" progress event
    return {"city": city, "temperature_c": 21, "sky": "sunny"}
