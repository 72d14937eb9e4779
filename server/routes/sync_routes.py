"""Device-facing routes: hub identity, enrolment, push and pull."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from server.hub import parse_enrol
from server.problems import Problem
from server.routes.deps import NO_CONTROL, HubDep, RequestId

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")
OCTETS = "application/octet-stream"
_ENVELOPE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}},
    }
}
_ENVELOPE_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}},
        "description": "sealed",
    }
}


class PublicKeysIn(BaseModel):
    signing: str = Field(max_length=128)
    kem: str = Field(max_length=4096)
    kem_algorithm: str = Field(max_length=32)


class EnrolIn(BaseModel):
    code: str = Field(min_length=1, max_length=64)
    device_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    site: str = Field(min_length=1, max_length=64)
    public_keys: PublicKeysIn


class HubInfoPublic(BaseModel):
    public_keys: dict[str, str]
    fingerprint: str
    epoch: str
    protocol: int


class EnrolPublic(BaseModel):
    device_id: str
    sites: list[str]
    hub: HubInfoPublic


@router.get("/hub", response_model=HubInfoPublic)
def hub_info(hub: HubDep) -> HubInfoPublic:
    """The hub's public keys and fingerprint (compare it with what the hub operator reads out)."""
    return HubInfoPublic.model_validate(hub.info())


@router.post("/enrol", response_model=EnrolPublic)
def enrol(body: EnrolIn, hub: HubDep, rid: RequestId) -> EnrolPublic:
    """Enrol a device with a one-time code; answers the hub's keys to pin."""
    return EnrolPublic.model_validate(hub.enrol(parse_enrol(body.model_dump()), request_id=rid))


async def _body(request: Request, limit: int) -> bytes:
    if request.headers.get("content-type", OCTETS).split(";")[0].strip() != OCTETS:
        raise Problem(415, "request.media_type", f"send the envelope as {OCTETS}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "request.too_large", f"an envelope may be at most {limit} bytes")
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise Problem(413, "request.too_large", f"an envelope may be at most {limit} bytes")
    except ClientDisconnect:  # the link dropped mid-upload: nobody hears this, nothing logged
        raise Problem(400, "request.incomplete", "the connection closed mid-envelope") from None
    return bytes(data)


@router.post(
    "/sync/push",
    openapi_extra=_ENVELOPE_BODY,
    responses=_ENVELOPE_ANSWER,
    response_class=Response,
)
async def push(request: Request, hub: HubDep, rid: RequestId) -> Response:
    """Apply a sealed batch of edits; answers a sealed acknowledgement."""
    envelope = await _body(request, hub.settings.max_request_bytes)
    sealed = await run_in_threadpool(hub.push, envelope, request_id=rid)
    return Response(sealed, media_type=OCTETS)


@router.get("/sync/pull", responses=_ENVELOPE_ANSWER, response_class=Response)
async def pull(
    request: Request,
    hub: HubDep,
    rid: RequestId,
    cursor: Annotated[str, Query(max_length=256, pattern=NO_CONTROL)] = "",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> Response:
    """A sealed page of edits after `cursor`; the request is signed (RFC 9421)."""
    raw_query = request.scope.get("query_string", b"").decode("latin-1")
    sealed = await run_in_threadpool(
        hub.pull,
        raw_query=raw_query,
        headers=request.headers,
        cursor=cursor,
        limit=limit,
        request_id=rid,
    )
    return Response(sealed, media_type=OCTETS)
