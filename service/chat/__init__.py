"""Use cases: what the service does with messages, free of HTTP and websocket concerns."""
