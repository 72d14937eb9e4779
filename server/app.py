"""The hub's FastAPI application: wiring only; routes live in `server/routes`."""

from __future__ import annotations

from fastapi import FastAPI

from server.hub import Hub
from server.problems import install_handlers
from server.routes import health, sync_routes
from server.settings import HubSettings

__all__ = ["create_app"]


def create_app(settings: HubSettings | None = None, *, hub: Hub | None = None) -> FastAPI:
    """Build the app for `settings` (from the environment when omitted)."""
    settings = settings or HubSettings()
    app = FastAPI(
        title="fieldreg hub",
        version="0.1.0",
        description="Encrypted sync of offline registrations. Errors are application/problem+json.",
    )
    app.state.hub = hub or Hub(settings)
    install_handlers(app)
    app.include_router(health.router)
    app.include_router(sync_routes.router)
    return app
