"""Reading registrations from people: JSON files and interactive prompts.

Nothing here writes to the store; it turns input into validated
`RegistrationCreate` values or a list of `FieldError`s naming every bad field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from schemas.enums import ConsentScope, Intention, LegalBasis, Need, Scenario, Sex, Vulnerability
from schemas.fields import parse_date_of_birth
from schemas.record import RegistrationCreate
from schemas.validation import FieldError, InvalidRecord, validate

__all__ = ["parse_json_records", "prompt_record", "validate_all"]


def parse_json_records(text: str) -> list[Any]:
    """Parse one JSON object, a JSON array, or JSON Lines. Raises InvalidRecord."""
    stripped = text.strip()
    if not stripped:
        raise InvalidRecord([FieldError("input", "no records: the input is empty")])
    if stripped[0] == "[":
        try:
            data = _loads(stripped)
        except ValueError as exc:
            raise InvalidRecord([FieldError("input", f"not valid JSON: {exc}")]) from None
        if not data:
            raise InvalidRecord([FieldError("input", "no records: the JSON array is empty")])
        return list(data)
    try:
        return [_loads(stripped)]
    except ValueError:
        pass
    items: list[Any] = []
    errors: list[FieldError] = []
    for number, line in enumerate(stripped.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(_loads(line))
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            errors.append(FieldError(f"line {number}", f"not valid JSON: {reason}"))
    if errors:
        raise InvalidRecord(errors)
    return items


def _loads(text: str) -> Any:
    """`json.loads`, with nesting too deep for it a ValueError like any bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def validate_all(items: list[Any]) -> list[RegistrationCreate]:
    """Validate every item; raise one InvalidRecord listing all errors of all items
    (an id given to two records is an error of the second)."""
    valid: list[RegistrationCreate] = []
    errors: list[FieldError] = []
    first_with: dict[str, int] = {}
    many = len(items) > 1
    for number, item in enumerate(items, start=1):
        prefix = f"record {number}" if many else ""
        if not isinstance(item, dict):
            reason = f"expected a JSON object, got {_json_kind(item)}"
            errors.append(FieldError(prefix, reason))
            continue
        try:
            record = validate(RegistrationCreate, item)
        except InvalidRecord as exc:
            errors.extend(FieldError(_joined(prefix, e.path), e.reason) for e in exc.errors)
            continue
        valid.append(record)
        if record.id is not None:
            first = first_with.setdefault(str(record.id), number)
            if first != number:
                reason = f"record {first} has the same id: give each person their own"
                errors.append(FieldError(_joined(prefix, "id"), reason))
    if errors:
        raise InvalidRecord(errors)
    return valid


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


def _joined(prefix: str, path: str) -> str:
    return f"{prefix}: {path}" if prefix and path else prefix or path


Ask = Callable[[str, str], str]


def _choices(enum: Any) -> str:
    return ", ".join(m.value for m in enum)


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _communication(ask: Ask) -> dict[str, Any] | None:
    language = ask("Preferred language to talk with them (ISO 639 code; empty: skip)", "")
    if not language.strip():
        return None
    needed = ask("Interpreter needed for it? (yes/no)", "no").strip().lower()
    return {"language": language.strip().lower(), "interpreter_needed": needed in {"y", "yes"}}


def prompt_record(ask: Ask, *, operator: str) -> dict[str, Any]:
    """Ask for a registration field by field; return the raw input for validation.

    `ask(question, default)` returns what the person typed. Empty answers
    leave optional fields out.
    """

    def opt(question: str, default: str = "") -> str | None:
        return ask(question, default).strip() or None

    record: dict[str, Any] = {
        "names": {
            "given": opt("Given name (Latin letters)"),
            "family": opt("Family name (Latin letters)"),
            "given_original": opt("Given name (original script)"),
            "family_original": opt("Family name (original script)"),
            "aliases": _split(ask("Other names, comma separated", "")),
        },
        "sex": ask(f"Sex ({_choices(Sex)})", "unknown"),
        "nationalities": [
            c.upper() for c in _split(ask("Nationalities (ISO codes, e.g. EGY,TCD)", ""))
        ],
        "languages": _split(ask("Languages (ISO 639 codes, e.g. ar,fr)", "")),
        "communication": _communication(ask),
        "phone": opt("Phone"),
        "occupation": opt("Occupation"),
        "employer": opt("Employer"),
        "situation": {
            "scenario": ask(f"Scenario ({_choices(Scenario)})", "crossed_border"),
            "vulnerabilities": _split(ask("Vulnerabilities, comma separated (? for the list)", "")),
            "needs": _split(ask(f"Needs, comma separated ({_choices(Need)})", "")),
            "intention": opt(f"Intention ({_choices(Intention)})"),
        },
        "notes": opt("Notes"),
    }
    if record["situation"]["vulnerabilities"] == ["?"]:
        record["situation"]["vulnerabilities"] = _split(
            ask(f"Vulnerabilities ({_choices(Vulnerability)})", "")
        )
    try:
        record["date_of_birth"] = parse_date_of_birth(
            ask("Date of birth (YYYY-MM-DD, YYYY, ~YYYY if estimated; empty if unknown)", "")
        )
    except ValueError:
        record["date_of_birth"] = None
    given = ask("Consent given? (yes/no)", "yes").strip().lower() in {"y", "yes"}
    record["consent"] = {
        "given": given,
        "legal_basis": ask(
            f"Legal basis ({_choices(LegalBasis)})", "consent" if given else "vital_interest"
        ),
        "scope": _split(
            ask(f"Consent scope ({_choices(ConsentScope)})", "registration" if given else "")
        ),
        "recorded_by": operator,
    }
    return {k: v for k, v in record.items() if v is not None}
