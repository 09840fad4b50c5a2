"""The two scope extensions a server may offer the websocket endpoint (no uvicorn import here:
the endpoint works without them, on any ASGI server).

``service.realtime.uvicorn_ws`` offers both on the fast path (``service.fastpath``); on the
public ASGI path neither is in the scope and the endpoint awaits ``websocket.send`` for every
frame, with the same frames in the same order for the client.
"""

DETACH = "chat.detach"
"""Scope extension: ``scope["extensions"][DETACH](serve)`` asks the server to run ``serve()``
in the same task once the app has returned, so the frames of the middleware and routing stack
(FastAPI, Starlette: ~10 kB per connection) are freed for the long life of the websocket."""

SEND_NOWAIT = "chat.send_texts_nowait"
"""Scope extension: ``scope["extensions"][SEND_NOWAIT](frames)`` (texts or ``SharedFrame``s)
writes these text frames at once, in one write (one system call for a burst), and
returns True, or returns False when the ASGI ``send`` is needed (paused for backpressure,
closing, closed): the caller then awaits that, which waits or raises as usual."""
