"""Reading registrations from people: JSON files and interactive prompts.

Nothing here writes to the store; it turns input into validated
`RegistrationCreate` values or a list of `FieldError`s naming every bad field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from rich.console import Console

from schemas.enums import ConsentScope, Intention, LegalBasis, Need, Scenario, Sex, Vulnerability
from schemas.fields import parse_date_of_birth
from schemas.record import (
    Communication,
    Consent,
    DateOfBirth,
    Names,
    RegistrationCreate,
    Situation,
)
from schemas.validation import FieldError, InvalidRecord, errors_of, validate

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
Say = Callable[[str], None]
Check = Callable[[Any], list[FieldError]]

_YES, _NO = {"y", "yes"}, {"n", "no"}
_DATE_EXPECTED = "type YYYY-MM-DD, YYYY, or ~YYYY if estimated; empty if unknown"
_TEXT_EXPECTED = "up to 200 characters, or empty"
_SOME = "values from the question, comma separated, each once, or empty"


def _choices(enum: Any) -> str:
    return ", ".join(m.value for m in enum)


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _optional(text: str) -> str | None:
    return text.strip() or None


def _word(text: str) -> str | None:
    return text.strip().lower() or None


@cache
def _adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    """The record model's own type for one field, with its validators."""
    info = model.model_fields[name]
    kind: Any = info.annotation
    if info.metadata:
        kind = Annotated[(kind, *info.metadata)]
    return TypeAdapter(kind)


def _field(model: type[BaseModel], name: str) -> Check:
    """A check of one answer by the rules of field `name` of `model`."""

    def check(value: Any) -> list[FieldError]:
        try:
            _adapter(model, name).validate_python(value)
        except ValidationError as exc:
            return errors_of(exc)
        return []

    return check


def _whole(model: type[BaseModel], build: Callable[[Any], Any]) -> Check:
    """A check of one answer as part of a small model (`build` makes its input)."""

    def check(value: Any) -> list[FieldError]:
        try:
            validate(model, build(value))
        except InvalidRecord as exc:
            return exc.errors
        return []

    return check


_LONG_CHOICE = re.compile(r"input should be '[^']*'(, '[^']*'){6,}")


def _reason(error: FieldError) -> str:
    # A vocabulary of dozens is listed by the question (or its `?`), and a pattern
    # is said in words by "Expected": neither again in each complaint.
    if _LONG_CHOICE.match(error.reason):
        return "not one of the listed values"
    if error.reason.startswith("string should match pattern"):
        return "not in the expected form"
    return error.reason


def _complaint(errors: list[FieldError], typed: str, value: Any) -> str:
    """The reasons, each naming what was typed (the item of a list, not its index)."""
    parts = []
    for error in errors:
        index = re.fullmatch(r"\[(\d+)\]", error.path)
        if index and isinstance(value, list) and int(index[1]) < len(value):
            parts.append(f"'{value[int(index[1])]}': {_reason(error)}")
        elif typed.strip() and not isinstance(value, list):
            parts.append(f"'{typed.strip()}': {_reason(error)}")
        else:
            parts.append(_reason(error))
    return "; ".join(parts)


def _asked(
    ask: Ask,
    say: Say,
    question: str,
    default: str,
    read: Callable[[str], Any],
    check: Check,
    expected: str,
    *,
    typed: str | None = None,
) -> Any:
    """Ask until the answer passes `check` (`typed`: a first answer read already);
    say what is wrong before asking again."""
    while True:
        typed = ask(question, default) if typed is None else typed
        value = read(typed)
        errors = check(value)
        if not errors:
            return value
        label = question.split(" (")[0].split(",")[0]
        say(f"{label} not accepted: {_complaint(errors, typed, value)}. Expected: {expected}")
        typed = None


def _yes_no(ask: Ask, say: Say, question: str, default: str) -> bool:
    def check(value: str) -> list[FieldError]:
        return [] if value in _YES | _NO else [FieldError("", "not yes or no")]

    answer = _asked(ask, say, question, default, lambda t: t.strip().lower(), check, "yes or no")
    return answer in _YES


def _say_on_console(message: str) -> None:
    Console(stderr=True, emoji=False).print(message, markup=False, highlight=False, soft_wrap=True)


def _names(ask: Ask, say: Say) -> dict[str, Any]:
    questions = {
        "given": "Given name (Latin letters)",
        "family": "Family name (Latin letters)",
        "given_original": "Given name (original script)",
        "family_original": "Family name (original script)",
    }
    while True:
        names: dict[str, Any] = {
            key: _asked(ask, say, q, "", _optional, _field(Names, key), _TEXT_EXPECTED)
            for key, q in questions.items()
        }
        if any(names.values()):
            break
        say("Names not accepted: at least one given or family name is required. Expected: a name")
    names["aliases"] = _asked(
        ask,
        say,
        "Other names, comma separated",
        "",
        _split,
        _field(Names, "aliases"),
        "names of up to 200 characters, each once, or empty",
    )
    return names


def _communication(ask: Ask, say: Say) -> dict[str, Any] | None:
    def check(language: str | None) -> list[FieldError]:
        if language is None:
            return []
        return _whole(Communication, lambda v: {"language": v, "interpreter_needed": False})(
            language
        )

    language = _asked(
        ask,
        say,
        "Preferred language to talk with them (ISO 639 code; empty: skip)",
        "",
        _word,
        check,
        "an ISO 639 code of 2 or 3 lower-case letters, e.g. ar, or empty",
    )
    if language is None:
        return None
    needed = _yes_no(ask, say, "Interpreter needed for it? (yes/no)", "no")
    return {"language": language, "interpreter_needed": needed}


def _situation(ask: Ask, say: Say) -> dict[str, Any]:
    situation: dict[str, Any] = {
        "scenario": _asked(
            ask,
            say,
            f"Scenario ({_choices(Scenario)})",
            "crossed_border",
            lambda t: t.strip().lower(),
            _field(Situation, "scenario"),
            "one of the values in the question",
        )
    }
    question = "Vulnerabilities, comma separated (? for the list)"
    first: str | None = ask(question, "")
    if _split(first or "") == ["?"]:
        question, first = f"Vulnerabilities ({_choices(Vulnerability)})", None
    situation["vulnerabilities"] = _asked(
        ask,
        say,
        question,
        "",
        _split,
        _field(Situation, "vulnerabilities"),
        "codes from the list (? shows it), each once, or empty",
        typed=first,
    )
    situation["needs"] = _asked(
        ask,
        say,
        f"Needs, comma separated ({_choices(Need)})",
        "",
        _split,
        _field(Situation, "needs"),
        _SOME,
    )
    intention = _asked(
        ask,
        say,
        f"Intention ({_choices(Intention)})",
        "",
        _word,
        _field(Situation, "intention"),
        "one of the values in the question, or empty",
    )
    if intention is not None:
        situation["intention"] = intention
    return situation


def _consent(ask: Ask, say: Say, operator: str) -> dict[str, Any]:
    given = _yes_no(ask, say, "Consent given? (yes/no)", "yes")

    def consent(basis: Any, scope: Any) -> dict[str, Any]:
        return {"given": given, "legal_basis": basis, "scope": scope, "recorded_by": operator}

    basis = _asked(
        ask,
        say,
        f"Legal basis ({_choices(LegalBasis)})",
        "consent" if given else "vital_interest",
        lambda t: t.strip().lower(),
        _whole(Consent, lambda b: consent(b, [])),
        "one of the values in the question" + ("" if given else " other than consent"),
    )
    scope = _asked(
        ask,
        say,
        f"Consent scope ({_choices(ConsentScope)})",
        "registration" if given else "",
        _split,
        _whole(Consent, lambda s: consent(basis, s)),
        _SOME if given else "empty: consent was not given",
    )
    return consent(basis, scope)


def prompt_record(ask: Ask, *, operator: str, say: Say | None = None) -> dict[str, Any]:
    """Ask for a registration field by field; return the raw input for validation.

    `ask(question, default)` returns what the person typed. Every answer is
    checked by the record model's own rules for its field as soon as it is
    typed: a wrong one is asked again after `say` (default: the terminal's
    standard error) tells in one line what is wrong and what is expected, and
    the answers before it are kept. Empty answers leave optional fields out.
    Rules across fields of different questions are left to the final validation.
    """
    say = say or _say_on_console

    def text(question: str, model: type[BaseModel], name: str, expected: str) -> Any:
        return _asked(ask, say, question, "", _optional, _field(model, name), expected)

    record: dict[str, Any] = {
        "names": _names(ask, say),
        "sex": _asked(
            ask,
            say,
            f"Sex ({_choices(Sex)})",
            "unknown",
            lambda t: t.strip().lower(),
            _field(RegistrationCreate, "sex"),
            f"one of {_choices(Sex)}",
        ),
        "nationalities": _asked(
            ask,
            say,
            "Nationalities (ISO codes, e.g. EGY,TCD)",
            "",
            lambda t: [c.upper() for c in _split(t)],
            _field(RegistrationCreate, "nationalities"),
            "ISO 3166-1 alpha-3 codes, e.g. EGY,TCD, each once, or empty",
        ),
        "languages": _asked(
            ask,
            say,
            "Languages (ISO 639 codes, e.g. ar,fr)",
            "",
            lambda t: [c.lower() for c in _split(t)],
            _field(RegistrationCreate, "languages"),
            "ISO 639 codes of 2 or 3 letters, e.g. ar,fr, each once, or empty",
        ),
        "communication": _communication(ask, say),
        "phone": text(
            "Phone",
            RegistrationCreate,
            "phone",
            "4 to 24 digits, spaces, ( ) or -, an optional leading +; or empty",
        ),
        "occupation": text("Occupation", RegistrationCreate, "occupation", _TEXT_EXPECTED),
        "employer": text("Employer", RegistrationCreate, "employer", _TEXT_EXPECTED),
        "situation": _situation(ask, say),
        "notes": text("Notes", RegistrationCreate, "notes", "up to 4000 characters, or empty"),
        "date_of_birth": _asked(
            ask,
            say,
            "Date of birth (YYYY-MM-DD, YYYY, ~YYYY if estimated; empty if unknown)",
            "",
            parse_date_of_birth,
            lambda v: [] if v is None else _whole(DateOfBirth, lambda d: d)(v),
            _DATE_EXPECTED,
        ),
    }
    record["consent"] = _consent(ask, say, operator)
    return {k: v for k, v in record.items() if v is not None}
