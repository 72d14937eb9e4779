"""A seeded generator of plausible registrations for benchmarks and load tests.

Names come from the origin groups of the 2011 Libya evacuation (Egypt, Sudan,
Chad, Niger, Ghana, Nigeria, Bangladesh, the Philippines), some with their
original-script spelling, so search and matching meet real variety.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["GROUPS", "person"]

# (nationality, given names, family names, original-script pairs)
GROUPS: list[tuple[str, list[str], list[str], dict[str, str]]] = [
    (
        "EGY",
        [
            "Mohamed",
            "Mahmoud",
            "Ahmed",
            "Mostafa",
            "Hassan",
            "Ibrahim",
            "Youssef",
            "Omar",
            "Fatma",
            "Aya",
        ],
        ["Abdel Rahman", "El Sayed", "Hassan", "Ali", "Mansour", "Farouk", "Shahin", "Nour"],
        {
            "Mohamed": "محمد",
            "Ahmed": "أحمد",
            "Hassan": "حسن",
            "Ali": "علي",
            "Fatma": "فاطمة",
            "Omar": "عمر",
        },
    ),
    (
        "SDN",
        ["Muhammad", "Osman", "Abdallah", "Hussein", "Khalid", "Amna", "Mariam", "Suleiman"],
        ["Osman", "Adam", "Ishag", "Abakar", "Musa", "Hamid", "Babiker"],
        {"Osman": "عثمان", "Hussein": "حسين", "Musa": "موسى", "Adam": "آدم"},
    ),
    (
        "TCD",
        ["Mahamat", "Abakar", "Hissein", "Zenaba", "Haoua", "Idriss", "Moussa"],
        ["Deby", "Oumar", "Saleh", "Brahim", "Adoum", "Youssouf"],
        {},
    ),
    (
        "NER",
        ["Moussa", "Issoufou", "Amadou", "Hadiza", "Ousmane", "Salamatou", "Boubacar"],
        ["Mahamadou", "Garba", "Issa", "Abdou", "Moumouni", "Hamani"],
        {},
    ),
    (
        "GHA",
        ["Kwame", "Kofi", "Akosua", "Yaw", "Abena", "Kwabena", "Efua", "Kojo"],
        ["Mensah", "Owusu", "Boateng", "Asante", "Osei", "Appiah", "Darko"],
        {},
    ),
    (
        "NGA",
        ["Chinedu", "Emeka", "Ngozi", "Oluwaseun", "Aisha", "Ibrahim", "Grace", "Tunde"],
        ["Okafor", "Adeyemi", "Okonkwo", "Bello", "Eze", "Abubakar", "Balogun"],
        {},
    ),
    (
        "BGD",
        ["Mohammad", "Abdul", "Rahim", "Karim", "Nasrin", "Shahana", "Jamal", "Rafiq"],
        ["Hossain", "Rahman", "Islam", "Uddin", "Akter", "Miah", "Chowdhury"],
        {"Mohammad": "মোহাম্মদ", "Rahman": "রহমান", "Karim": "করিম", "Islam": "ইসলাম"},
    ),
    (
        "PHL",
        ["Maria", "Jose", "Rodel", "Marites", "Jonathan", "Liza", "Ramon", "Analyn"],
        ["Santos", "Reyes", "Cruz", "Bautista", "Garcia", "Mendoza", "Villanueva"],
        {},
    ),
]

SCENARIOS = [
    "no_access_to_assistance",
    "trapped",
    "unwilling_to_leave",
    "internally_displaced",
    "crossed_border",
    "returned_or_evacuated",
]
NEEDS = [
    "consular_assistance",
    "evacuation",
    "health_referral",
    "shelter",
    "food",
    "family_tracing",
    "legal_aid",
]
VULNS = [
    "legal_status.documents_confiscated",
    "practical_barriers.no_money",
    "human_rights.exploitation",
    "socio_economic.unpaid_wages",
    "gender_age_health.pregnant",
]


def person(rng: random.Random) -> dict[str, Any]:
    """One registration as a form would send it (no id: the device makes one)."""
    nationality, givens, families, originals = rng.choice(GROUPS)
    given, family = rng.choice(givens), rng.choice(families)
    names: dict[str, Any] = {"given": given, "family": family}
    if given in originals and rng.random() < 0.5:
        names["given_original"] = originals[given]
        if family in originals:
            names["family_original"] = originals[family]
    year = rng.randint(1955, 2012)
    precision = rng.choice(["exact", "exact", "exact", "year", "estimated"])
    return {
        "names": names,
        "sex": rng.choice(["female", "male"]),
        "date_of_birth": {
            "value": f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "precision": precision,
        },
        "nationalities": [nationality],
        "documents": [
            {
                "type": "passport",
                "status": rng.choice(["held", "confiscated", "lost"]),
                "number": f"{rng.choice('ABCPN')}{rng.randint(1_000_000, 9_999_999)}",
                "issuing_country": nationality,
            }
        ],
        "phone": f"+218 9{rng.randint(1, 5)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
        "occupation": rng.choice(["mason", "driver", "cleaner", "farm worker", "nurse", "cook"]),
        "situation": {
            "scenario": rng.choice(SCENARIOS),
            "vulnerabilities": rng.sample(VULNS, rng.randint(0, 2)),
            "needs": rng.sample(NEEDS, rng.randint(1, 3)),
            "intention": rng.choice(["return_home", "stay", "move_on", "undecided"]),
        },
        "consent": {
            "given": True,
            "legal_basis": "consent",
            "scope": ["registration", "consular_notification"],
            "recorded_by": "bench",
        },
    }
