"""asyncpg from blocking code: the server is started and set up from sync code.

``EmbeddedPostgres.start()`` runs before the service's event loop exists (the CLI), inside one
(tests, ``asyncio.to_thread``), or from any thread; asyncpg is async only. ``run`` works in all
of these: it never touches a running loop, it runs the coroutine on a loop of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


def run(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, even when called inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
