"""The registration record: what a field worker records about one person.

`RegistrationCreate` is what a form or an import supplies; `Registration`
is the stored record: the same content plus its id, schema version and the
registration context the device fills in. Field-level sync works on the
flattened form (see `schemas.fields`).

Schema versions (a device's envelopes carry the version it was built with):

* 1: the first release.
* 2: adds `communication`: the language to talk with the person in and whether
  the team needs an interpreter for it.

A hub accepts envelopes from `MIN_SCHEMA_VERSION` to `SCHEMA_VERSION`; what it
does with a field an older version had and this one does not is in
`docs/sync-protocol.md` ("Schema versions").
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from schemas.countries import is_country_code
from schemas.enums import (
    ConsentScope,
    DatePrecision,
    DocumentStatus,
    DocumentType,
    Intention,
    LegalBasis,
    Need,
    ReferralStatus,
    Relationship,
    Scenario,
    Sex,
    Vulnerability,
)

__all__ = [
    "HIDDEN_IN_LINE",
    "MIN_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "Communication",
    "Consent",
    "CountryCode",
    "DateOfBirth",
    "Document",
    "DuplicateReview",
    "Household",
    "IsoDate",
    "Location",
    "Names",
    "Referral",
    "Registration",
    "RegistrationContent",
    "RegistrationContext",
    "RegistrationCreate",
    "Situation",
    "age_band",
]

SCHEMA_VERSION = 2
"""The version of the record schema this code writes and fully understands."""
MIN_SCHEMA_VERSION = 1
"""The oldest schema version a hub built from this code accepts pushes from.

Every released version so far only added fields, so a record written by any of
them is read by this code; raise it only when a version's data can no longer
be read safely (a field whose meaning changed under the same path), and say so
in `docs/sync-protocol.md`: devices below it are refused until updated."""

_SITE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _country(code: str) -> str:
    if not is_country_code(code):
        raise PydanticCustomError(
            "country_code",
            "'{code}' is not an ISO 3166-1 alpha-3 code",
            {"code": code},
        )
    return code


def _site(value: str) -> str:
    if not _SITE_RE.match(value):
        raise PydanticCustomError(
            "site",
            "'{value}' is not a site code (lower-case letters, digits, - and _, up to 64)",
            {"value": value},
        )
    return value


def _unique(values: list[str]) -> list[str]:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise PydanticCustomError("duplicate", "'{value}' is listed twice", {"value": value})
        seen.add(value)
    return values


# Control characters (a NUL ends a string in C, a stray escape redraws a
# terminal) and the bidirectional overrides and isolates that make a list show
# a name, or the text after it, other than it is. Right-to-left marks stay:
# Arabic and Hebrew text uses them.
_OVERRIDES = "\\x7f-\\x9f\\u202a-\\u202e\\u2066-\\u2069"
HIDDEN_IN_LINE = re.compile(f"[\\x00-\\x1f{_OVERRIDES}]")
_HIDDEN_IN_TEXT = re.compile(f"[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f{_OVERRIDES}]")  # tabs, lines: kept


def _shown_as_is(pattern: re.Pattern[str]) -> AfterValidator:
    def check(value: str) -> str:
        found = pattern.search(value)
        if found:
            raise PydanticCustomError(
                "hidden_character",
                "contains the invisible character U+{code}: remove it",
                {"code": f"{ord(found.group()):04X}"},
            )
        return value

    return AfterValidator(check)


Text = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    _shown_as_is(HIDDEN_IN_LINE),
]
LongText = Annotated[  # tabs and line breaks allowed
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=4000),
    _shown_as_is(_HIDDEN_IN_TEXT),
]
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _iso_date(value: Any) -> Any:
    # Pydantic's lax mode reads a number, or a string of digits, as a Unix
    # timestamp (0 and "0" were 1970-01-01) and takes a datetime at midnight:
    # a date is written YYYY-MM-DD (or given as a `date`), nothing else.
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and _ISO_DATE.fullmatch(value):
        return value  # its day and month are checked as a date next
    raise PydanticCustomError("iso_date", "input should be a valid date (YYYY-MM-DD)")


IsoDate = Annotated[date, BeforeValidator(_iso_date)]
CountryCode = Annotated[str, AfterValidator(_country)]
SiteCode = Annotated[str, AfterValidator(_site)]
LanguageCode = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}$")]
Phone = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^\+?[0-9 ()-]{4,24}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Names(_Model):
    """Names as written in Latin script and in the person's own script."""

    given: Text | None = None
    family: Text | None = None
    given_original: Text | None = None
    family_original: Text | None = None
    aliases: Annotated[list[Text], AfterValidator(_unique)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_a_name(self) -> Names:
        if not any((self.given, self.family, self.given_original, self.family_original)):
            raise PydanticCustomError("no_name", "at least one given or family name is required")
        return self

    def all_names(self) -> list[str]:
        """Every name written for the person, in any script (for match keys)."""
        parts = [self.given, self.family, self.given_original, self.family_original]
        return [p for p in parts if p] + list(self.aliases)


class DateOfBirth(_Model):
    """A birth date with how precisely it is known.

    For `year` precision the month and day are ignored (conventionally 1 January).
    """

    value: IsoDate
    precision: DatePrecision = DatePrecision.EXACT

    @model_validator(mode="after")
    def _not_in_future(self) -> DateOfBirth:
        today = datetime.now(UTC).date()
        if self.value > today:
            raise PydanticCustomError("future", "in the future")
        if self.value.year < today.year - 130:
            raise PydanticCustomError("too_old", "more than 130 years ago")
        return self


class Document(_Model):
    type: DocumentType
    status: DocumentStatus
    number: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)] | None
    ) = None
    issuing_country: CountryCode | None = None
    expiry: IsoDate | None = None


class Situation(_Model):
    scenario: Scenario
    vulnerabilities: Annotated[list[Vulnerability], AfterValidator(_unique)] = Field(
        default_factory=list
    )
    needs: Annotated[list[Need], AfterValidator(_unique)] = Field(default_factory=list)
    intention: Intention | None = None


class Household(_Model):
    """Link to a household or travelling group, shared by its members' records."""

    group_id: uuid.UUID
    relationship: Relationship


class Referral(_Model):
    service: Need
    status: ReferralStatus = ReferralStatus.PENDING
    reason: LongText | None = None
    referred_on: IsoDate
    updated_on: IsoDate | None = None

    @model_validator(mode="after")
    def _dates_in_order(self) -> Referral:
        if self.updated_on is not None and self.updated_on < self.referred_on:
            raise PydanticCustomError("order", "updated_on is before referred_on")
        return self


class Consent(_Model):
    given: bool
    legal_basis: LegalBasis
    scope: Annotated[list[ConsentScope], AfterValidator(_unique)] = Field(default_factory=list)
    recorded_by: Text

    @model_validator(mode="after")
    def _basis_matches(self) -> Consent:
        if self.legal_basis is LegalBasis.CONSENT and not self.given:
            raise PydanticCustomError(
                "consent_basis", "legal basis 'consent' requires consent to be given"
            )
        if not self.given and self.scope:
            raise PydanticCustomError(
                "consent_scope", "a scope was recorded but consent was not given"
            )
        return self


class Communication(_Model):
    """How to talk with the person (schema version 2): the language they understand
    best (ISO 639 code) and whether the team needs an interpreter for it, so that
    interviews, consent and referrals (health, legal aid) are planned with one."""

    language: LanguageCode
    interpreter_needed: bool


class Location(_Model):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    description: Text | None = None


class DuplicateReview(_Model):
    """What the field worker decided when the device found possible earlier
    registrations of the same person (offline, against its local records)."""

    decision: Literal["registered_anyway", "linked"]
    candidates: Annotated[list[uuid.UUID], Field(max_length=20)] = Field(default_factory=list)
    linked_to: uuid.UUID | None = None
    best_score: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _link_named(self) -> DuplicateReview:
        if (self.decision == "linked") != (self.linked_to is not None):
            raise PydanticCustomError(
                "link", "linked_to is set exactly when the decision is 'linked'"
            )
        return self


class RegistrationContent(_Model):
    """Everything about the person and their situation; what edits change."""

    names: Names
    sex: Sex = Sex.UNKNOWN
    date_of_birth: DateOfBirth | None = None
    nationalities: Annotated[list[CountryCode], AfterValidator(_unique)] = Field(
        default_factory=list
    )
    place_of_birth: Text | None = None
    languages: Annotated[list[LanguageCode], AfterValidator(_unique)] = Field(default_factory=list)
    communication: Communication | None = None
    documents: list[Document] = Field(default_factory=list)
    phone: Phone | None = None
    occupation: Text | None = None
    employer: Text | None = None
    situation: Situation
    household: Household | None = None
    referrals: list[Referral] = Field(default_factory=list)
    consent: Consent
    notes: LongText | None = None
    duplicate_review: DuplicateReview | None = None


class RegistrationCreate(RegistrationContent):
    """What a form or an import supplies. `id` may be given so that importing the
    same file twice registers nobody twice: a batch naming an id already
    registered is refused whole (`id: already registered`), nothing stored."""

    id: uuid.UUID | None = None
    location: Location | None = None


class RegistrationContext(_Model):
    """Where, by whom and when the person was first registered (set by the device)."""

    site: SiteCode
    device_id: Text
    operator: Text
    registered_at: datetime
    location: Location | None = None

    @model_validator(mode="after")
    def _aware(self) -> RegistrationContext:
        if self.registered_at.tzinfo is None:
            raise PydanticCustomError("naive_time", "registered_at needs a time zone")
        return self


class Registration(RegistrationContent):
    """A stored registration: content plus identity and context.

    `merged_into` is set by the hub when an operator merges this registration
    into another one of the same person; nothing of it is deleted.
    """

    id: uuid.UUID
    schema_version: int = SCHEMA_VERSION
    registration: RegistrationContext
    merged_into: uuid.UUID | None = None


def age_band(dob: DateOfBirth | None, on: date) -> str:
    """Return the reporting age band ('0-4', '5-11', '12-17', '18-59', '60+' or 'unknown')."""
    if dob is None:
        return "unknown"
    years = on.year - dob.value.year - ((on.month, on.day) < (dob.value.month, dob.value.day))
    if dob.precision is DatePrecision.YEAR:
        years = on.year - dob.value.year
    for upper, band in ((4, "0-4"), (11, "5-11"), (17, "12-17"), (59, "18-59")):
        if years <= upper:
            return band
    return "60+"
