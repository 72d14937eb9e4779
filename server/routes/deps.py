"""Dependencies shared by routes, written once."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.hub import Hub

__all__ = ["HubDep", "get_hub"]


def get_hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


HubDep = Annotated[Hub, Depends(get_hub)]
