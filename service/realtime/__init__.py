"""Real-time delivery: the per-process room hub, the LISTEN / Redis backends and the websocket
endpoint. The frames and channel names it delivers are ``service.chat.envelope``'s."""
