"""The closed vocabularies of a registration (DESIGN.md "Records").

Values are stable strings: they travel in sync envelopes and exports, so a
value is never renamed, only added.
"""

from enum import StrEnum

__all__ = [
    "VULNERABILITY_GROUPS",
    "ConsentScope",
    "DatePrecision",
    "DocumentStatus",
    "DocumentType",
    "Intention",
    "LegalBasis",
    "Need",
    "ReferralStatus",
    "Relationship",
    "Scenario",
    "Sex",
    "Vulnerability",
]


class Sex(StrEnum):
    FEMALE = "female"
    MALE = "male"
    OTHER = "other"
    UNKNOWN = "unknown"


class DatePrecision(StrEnum):
    EXACT = "exact"
    YEAR = "year"  # only the year is known; month and day are placeholders
    ESTIMATED = "estimated"  # an estimate, e.g. from apparent age


class DocumentType(StrEnum):
    PASSPORT = "passport"
    NATIONAL_ID = "national_id"
    RESIDENCE_PERMIT = "residence_permit"
    WORK_PERMIT = "work_permit"
    BIRTH_CERTIFICATE = "birth_certificate"
    TRAVEL_DOCUMENT = "travel_document"
    CONSULAR_CARD = "consular_card"
    OTHER = "other"


class DocumentStatus(StrEnum):
    HELD = "held"
    CONFISCATED = "confiscated"  # e.g. kept by an employer
    LOST = "lost"
    NONE = "none"  # the person never had one


class Scenario(StrEnum):
    """The six situations a migrant in a crisis country can be in."""

    NO_ACCESS_TO_ASSISTANCE = "no_access_to_assistance"
    TRAPPED = "trapped"
    UNWILLING_TO_LEAVE = "unwilling_to_leave"
    INTERNALLY_DISPLACED = "internally_displaced"
    CROSSED_BORDER = "crossed_border"
    RETURNED_OR_EVACUATED = "returned_or_evacuated"


class Vulnerability(StrEnum):
    """Vulnerabilities, named `<group>.<item>` in the five groups."""

    LEGAL_UNDOCUMENTED = "legal_status.undocumented"
    LEGAL_DOCUMENTS_CONFISCATED = "legal_status.documents_confiscated"
    LEGAL_IRREGULAR_STATUS = "legal_status.irregular_status"
    LEGAL_STATELESS = "legal_status.stateless"
    PRACTICAL_LANGUAGE = "practical_barriers.language"
    PRACTICAL_NO_MONEY = "practical_barriers.no_money"
    PRACTICAL_NO_TRANSPORT = "practical_barriers.no_transport"
    PRACTICAL_NO_INFORMATION = "practical_barriers.no_information"
    RIGHTS_DETENTION = "human_rights.detention"
    RIGHTS_EXPLOITATION = "human_rights.exploitation"
    RIGHTS_TRAFFICKING = "human_rights.trafficking"
    RIGHTS_XENOPHOBIC_VIOLENCE = "human_rights.xenophobic_violence"
    SOCIO_UNPAID_WAGES = "socio_economic.unpaid_wages"
    SOCIO_LOST_ASSETS = "socio_economic.lost_assets"
    SOCIO_DEBT = "socio_economic.debt"
    SOCIO_LOST_LIVELIHOOD = "socio_economic.lost_livelihood"
    GAH_UNACCOMPANIED_MINOR = "gender_age_health.unaccompanied_minor"
    GAH_ELDERLY = "gender_age_health.elderly"
    GAH_PREGNANT = "gender_age_health.pregnant"
    GAH_DISABILITY = "gender_age_health.disability"
    GAH_SERIOUS_MEDICAL = "gender_age_health.serious_medical_condition"
    GAH_SINGLE_PARENT = "gender_age_health.single_parent"
    GAH_GBV_SURVIVOR = "gender_age_health.gbv_survivor"


VULNERABILITY_GROUPS: tuple[str, ...] = (
    "legal_status",
    "practical_barriers",
    "human_rights",
    "socio_economic",
    "gender_age_health",
)


class Need(StrEnum):
    CONSULAR_ASSISTANCE = "consular_assistance"
    IN_SITU_PROTECTION = "in_situ_protection"
    HEALTH_REFERRAL = "health_referral"
    PSYCHOSOCIAL_REFERRAL = "psychosocial_referral"
    EVACUATION = "evacuation"
    BORDER_ASSISTANCE = "border_assistance"
    RETURN = "return"
    REINTEGRATION = "reintegration"
    SHELTER = "shelter"
    FOOD = "food"
    FAMILY_TRACING = "family_tracing"
    LEGAL_AID = "legal_aid"


class Intention(StrEnum):
    STAY = "stay"
    RETURN_HOME = "return_home"
    MOVE_ON = "move_on"
    UNDECIDED = "undecided"


class Relationship(StrEnum):
    """Relationship of the person to the head of their household or group."""

    HEAD = "head"
    SPOUSE = "spouse"
    CHILD = "child"
    PARENT = "parent"
    SIBLING = "sibling"
    OTHER_RELATIVE = "other_relative"
    UNRELATED = "unrelated"  # travelling in the same group, not family


class ReferralStatus(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    COMPLETED = "completed"
    DECLINED = "declined"
    CANCELLED = "cancelled"


class LegalBasis(StrEnum):
    CONSENT = "consent"
    VITAL_INTEREST = "vital_interest"
    PUBLIC_INTEREST = "public_interest"
    LEGITIMATE_INTEREST = "legitimate_interest"


class ConsentScope(StrEnum):
    REGISTRATION = "registration"
    SHARING_WITH_PARTNERS = "sharing_with_partners"
    CONSULAR_NOTIFICATION = "consular_notification"
