"""Real-time delivery: the websocket endpoint, the per-process room hub, the LISTEN / Redis
backends and uvicorn's fast path. The frames and channel names it delivers are
``service.chat.envelope``'s."""
