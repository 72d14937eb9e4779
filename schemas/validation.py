"""Turning bad input into a list of `path: reason` lines, every bad field at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

__all__ = [
    "FieldError",
    "InvalidRecord",
    "errors_of",
    "errors_of_request",
    "format_path",
    "validate",
]

M = TypeVar("M", bound=BaseModel)

_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown field",
}


@dataclass(frozen=True, slots=True)
class FieldError:
    """One bad field: its dotted path (`documents[0].number`) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class InvalidRecord(ValueError):
    """Raised with every bad field of one input; nothing was stored."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


def format_path(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic location as `a.b[2].c`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _reason(error: Any) -> str:
    kind = error["type"]
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    message: str = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return message[:1].lower() + message[1:]


def _loc(error: Any) -> tuple[int | str, ...]:
    # Validators on enum/union members add the type name to the location;
    # people want the field, not pydantic's internals.
    return tuple(p for p in error["loc"] if not (isinstance(p, str) and "[" in p))


def errors_of(exc: ValidationError) -> list[FieldError]:
    """Every error in a pydantic ValidationError as `FieldError`s, in input order."""
    return [FieldError(format_path(_loc(e)), _reason(e)) for e in exc.errors()]


def errors_of_request(errors: Any) -> list[str]:
    """`path: reason` lines for a FastAPI request validation error list.

    The first location part ('body', 'query', 'header') is kept: it tells the
    caller where to look.
    """
    return [str(FieldError(format_path(_loc(e)), _reason(e))) for e in errors]


def validate(model: type[M], data: Any) -> M:
    """Validate `data` as `model`; raise `InvalidRecord` listing every bad field."""
    if not isinstance(data, dict):
        raise InvalidRecord([FieldError("", f"expected a JSON object, got {type(data).__name__}")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRecord(errors_of(exc)) from None
