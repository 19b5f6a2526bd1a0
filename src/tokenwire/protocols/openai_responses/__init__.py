"""The OpenAI Responses API: ``/v1/responses``, streaming, background, resume, cancel.

One protocol in four modules: ``request`` (the create body), ``renderer`` (events and Response
objects), ``routes`` (the endpoints and stored responses, and ``PROTOCOL``), ``websocket``
(the WebSocket mode).

No model calls here. A response is a stream: ``resp_<stream id>``. Its events render as the
official ``openai`` SDK reads them: ``response.created``, ``response.in_progress``, then per
output item ``response.output_item.added`` … ``response.output_item.done`` (a message: its
``content_part.added``, ``output_text.delta``s, ``output_text.done``, ``content_part.done``; a
function call: ``function_call_arguments.delta``s and ``.done``), and one terminal event:
``response.completed``, ``response.incomplete`` (``max_output_tokens``, ``content_filter``),
``response.failed`` (after a flat ``error`` event) or ``response.cancelled``. Open output
items are closed (``status: "incomplete"``) before any terminal event but the completed one,
so partial output is kept. Each event carries ``sequence_number``, dense from 0, which is also
its SSE ``id:``; ``output_index`` / ``content_index`` are dense.

Several wire events come from one journal event, so positions are the renderer's own
(``Renderer.position_key``): a resume (``GET /v1/responses/{id}?stream=true&starting_after=N``
or ``Last-Event-ID``) renders the stream from its start, deterministically, and sends what
follows ``N``. Any replica can serve it: everything the renderer needs is in the journal
(``StreamMeta.render`` holds the request's echo fields, its input items and the
conversation before it).

Stored responses: every response lives in the journal for its TTL (``store: false`` ones too,
but those answer 404 to ``GET``, as OpenAI's do). ``background: true`` starts a stream that
keeps generating with no reader (``Parsed.background``); the POST answers at once. ``GET``
polls (the response rendered from the events so far), ``POST …/cancel`` stops the model on
whichever replica produces it and answers the final object, ``DELETE`` drops it,
``GET …/input_items`` lists what was sent. ``previous_response_id`` continues from a stored
response: its context, input and output (not its ``instructions``).

The WebSocket mode (``client.responses.connect()``) takes ``response.create`` frames on
``/v1/responses`` and sends the same event objects back (with the frame's ``stream_id``
lane, when it named one), one response in flight per connection; ``previous_response_id``
may name the connection's last response even when it was not stored.

Deliberate divergences, and why:
- A cancelled response's stream ends with ``response.cancelled`` (its ``response.status`` is
  ``cancelled``). OpenAI documents no terminal stream event for a cancel and its SDK types
  have none: every reader must still get a terminal event and a closed stream, and
  ``response.incomplete`` or ``response.failed`` would misreport a Stop. The SDK passes the
  event through by its ``type``; ``get_final_response()`` raises, as for any response that
  did not complete.
- ``output_text.delta`` carries ``logprobs: []``: logprobs are not offered (``include`` of
  ``message.output_text.logprobs`` and ``top_logprobs`` > 0 are refused with a 400).
- Built-in tools (web search, file search, code interpreter, MCP…), images, files, reasoning
  and ``truncation: "auto"`` are refused with a 400: the backends are text-only, and a
  request that silently lost them would mean something else.
- ``seed`` is accepted as an extension (the SDK's ``extra_body``): a seeded run is
  reproducible on the embedded model.
- A failed create answers with ``x-should-retry: false``: the SDK would otherwise retry a
  5xx and start a second generation.
"""

from tokenwire.protocols.openai_responses.renderer import ResponsesRenderer, history, snapshot
from tokenwire.protocols.openai_responses.request import build, parse_body
from tokenwire.protocols.openai_responses.routes import PROTOCOL, OpenAIResponses

__all__ = [
    "PROTOCOL",
    "OpenAIResponses",
    "ResponsesRenderer",
    "build",
    "history",
    "parse_body",
    "snapshot",
]
