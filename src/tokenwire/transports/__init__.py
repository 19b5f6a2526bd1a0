"""The framing of events on the wire: SSE and WebSocket, heartbeats, send timeouts, disconnects."""
