"""The hub's FastAPI application: wiring only; routes live in `server/routes`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

__all__ = ["EchoRequestId", "create_app"]


def _request_id(scope: Scope) -> str:
    """The caller's X-Request-ID if it is sane, else a new one."""
    given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"")
    text = given.decode("latin-1")
    if 0 < len(text) <= 64 and text.isascii() and text.isprintable():
        return text
    return uuid.uuid4().hex


class EchoRequestId:
    """Gives every request an id (the caller's X-Request-ID if sane, else a new
    one), kept in the request's state for the audit log
    (`routes.deps.request_id`), and puts it on every answer as X-Request-ID,
    refusals before any route ran included.

    Plain ASGI: Starlette's `@app.middleware("http")` runs every request
    through extra tasks and streams, a few hundred microseconds of each push."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        await self.app(scope, receive, send_with_id)


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

    app.add_middleware(EchoRequestId)
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
