"""Checking the field values of pushed edits: one validation per edit, not per field.

`schemas.fields.field_error` is the rule: a value is acceptable for a field
exactly when it returns None. Calling it for each of the ~15 fields of a
registration costs more than the validation itself, so the hub first checks
all known fields of an edit in one pass with the same annotations, and only
an edit that fails that pass is checked field by field, which also gives the
message `field_error` would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from typing_extensions import TypedDict

from schemas.fields import FIELD_PATHS, field_error
from schemas.record import Names, Registration, Situation

__all__ = ["edit_field_error"]


def _annotation(info: FieldInfo) -> Any:
    annotation: Any = info.annotation
    if info.metadata:
        annotation = Annotated[(annotation, *info.metadata)]
    return annotation


@lru_cache(maxsize=1)
def _all_fields() -> TypeAdapter[Any]:
    spec: dict[str, Any] = {}
    for path in FIELD_PATHS:
        head, _, tail = path.partition(".")
        if tail:
            model = Names if head == "names" else Situation
            spec[path] = _annotation(model.model_fields[tail])
        else:
            spec[path] = _annotation(Registration.model_fields[head])
    # Keys not listed (fields of a newer schema) are ignored, as `field_error` accepts them.
    return TypeAdapter(TypedDict("EditFields", spec, total=False))  # type: ignore[operator]


def edit_field_error(
    fields: Sequence[tuple[str, Any]], by_path: Mapping[str, Any] | None = None
) -> tuple[str, str] | None:
    """The first `(path, reason)` among `fields` that `field_error` refuses, or None.

    Changes nothing. Paths must be distinct (an edit names each field once);
    `by_path` is `dict(fields)` when the caller has it already.
    """
    try:
        _all_fields().validate_python(dict(fields) if by_path is None else by_path)
    except ValidationError:
        pass
    else:
        return None
    for path, value in fields:
        problem = field_error(path, value)
        if problem:
            return path, problem
    return None
