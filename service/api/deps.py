"""REST dependency aliases. The ones websockets share (``CurrentUser``, ``RoomName``) are
``service.auth``'s."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from service.services import Services


async def get_services(conn: HTTPConnection) -> Services:
    """Async on purpose, like every dependency here: a sync one would run in a thread."""
    services: Services = conn.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
