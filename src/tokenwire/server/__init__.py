"""The HTTP server: the app built from the protocol registry, auth, limits, metrics, drain, UI."""
