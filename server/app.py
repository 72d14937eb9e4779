"""The hub's FastAPI application: wiring only; routes live in `server/routes`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from server.hub import Hub
from server.problems import install_handlers
from server.routes import (
    audit_routes,
    auth_routes,
    duplicate_routes,
    health,
    people_routes,
    sync_routes,
)
from server.settings import HubSettings

__all__ = ["create_app"]


def create_app(settings: HubSettings | None = None, *, hub: Hub | None = None) -> FastAPI:
    """Build the app for `settings` (from the environment when omitted)."""
    settings = settings or HubSettings()
    the_hub = hub or Hub(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        the_hub.checker.start()  # duplicate checks of pushed records, after each push
        try:
            yield
        finally:
            the_hub.checker.stop()

    app = FastAPI(
        title="fieldreg hub",
        version="0.1.0",
        description="Encrypted sync of offline registrations. Errors are application/problem+json.",
        lifespan=lifespan,
    )
    app.state.hub = the_hub
    install_handlers(app)
    app.include_router(health.router)
    app.include_router(sync_routes.router)
    app.include_router(auth_routes.router)
    app.include_router(people_routes.router)
    app.include_router(audit_routes.router)
    app.include_router(duplicate_routes.router)

    @app.middleware("http")
    async def echo_request_id(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        rid = getattr(request.state, "request_id", None)
        if rid:
            response.headers["X-Request-ID"] = rid
        return response

    _document_problems(app)
    return app


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "code": {"type": "string", "description": "stable, dotted: what a client acts on"},
        "detail": {"type": "string"},
    },
    "additionalProperties": True,
}


def _document_problems(app: FastAPI) -> None:
    """Every error answer is application/problem+json: say so in the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
        problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for item in schema["paths"].values():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                for status, answer in list(responses.items()):
                    if not status.startswith("2"):
                        responses[status] = {
                            "description": answer.get("description", "problem"),
                            "content": problem,
                        }
                responses["4XX"] = {"description": "a problem (see `code`)", "content": problem}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
