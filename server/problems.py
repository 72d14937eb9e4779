"""One error shape for the whole hub: `Problem(status, code, detail)` rendered as
`application/problem+json` (RFC 9457) with a stable dotted `code`."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.validation import errors_of_request

__all__ = ["PROBLEM_JSON", "Problem", "install_handlers", "problem_response"]

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("fieldreg.hub")

_TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Invalid request",
    500: "Internal error",
    503: "Unavailable",
}


class Problem(Exception):
    """An answer that is not a success, with a stable `code` clients can act on."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int, code: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {
        "type": f"urn:fieldreg:problem:{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Every error the app can raise becomes a problem+json answer; nothing leaks."""

    @app.exception_handler(Problem)
    async def _problem(_request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = errors_of_request(exc.errors())
        detail = "; ".join(errors) or "the request is not valid"
        return problem_response(422, "request.invalid", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            400: "request.invalid",  # e.g. a JSON body that is not UTF-8
            401: "auth.required",
            404: "route.not_found",
            405: "route.method_not_allowed",
        }
        code = codes.get(exc.status_code, f"http.{exc.status_code}")
        headers = getattr(exc, "headers", None)  # a 405 carries Allow
        return problem_response(exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(sa.exc.OperationalError)
    async def _database(_request: Request, exc: sa.exc.OperationalError) -> JSONResponse:
        # A lock held past `busy_timeout_s` (a long scan, a backup), or the
        # database gone: the request changed nothing, and a retry may pass.
        log.warning("database did not answer: %s", str(exc.orig).splitlines()[0])
        return problem_response(
            503,
            "database.unavailable",
            "the hub's database did not answer in time; nothing was changed, try again",
            headers={"Retry-After": "10"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return problem_response(500, "hub.internal", "the hub failed; the error is logged")
