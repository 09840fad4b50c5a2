"""Real-time delivery: channel names, notification envelopes, the listener and the websocket."""
