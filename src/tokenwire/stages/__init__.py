"""Event-stream stages: stop sequences, structured output, tool calls, coalescing, guards."""
