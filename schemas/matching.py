"""Duplicate detection: blocking keys and a field-by-field, explained match score.

Pure functions, no I/O, shared by the hub and the devices. A registration is
read as the JSON document of `Registration.model_dump(mode="json")`, leniently:
any field may be missing or malformed, and such a field is simply no evidence.

`record_keys` gives the blocking keys: two records are compared only if they
share one, so each key combines evidence (every key is short ASCII):

* ``n:<c1>+<c2>`` two name codes of the record, sorted; a code is the skeleton
  of the token's variant group or of the token (``mhmt`` for every Muhammad);
  ``n:<c>`` alone only for a record with one long name (Moneeruddin);
* ``y:<c>@<year>`` one name code that is not in `COMMON_NAME_CODES` + a birth
  year (a year-only date also keys the year either side; an estimate, none);
* ``b:<c>@<yyyy-mm-dd>`` any name code + an exact birth date;
* ``d:<NUMBER>`` a document number, letters and digits only, upper-cased;
* ``p:<8 digits>`` the last 8 digits of the phone number.

A common first name is never a key alone, nor with only a birth year.

`score` compares two records the Fellegi-Sunter way: each field adds log-odds
for (agree) or against (disagree) "one person", a missing field adds 0, and
the sum goes through a logistic. With `key_counts` from the caller's index
an agreeing name weighs by how many records carry it (term frequency).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Any, Literal, NamedTuple, TypeVar

from rapidfuzz import fuzz
from rapidfuzz.distance import DamerauLevenshtein

from schemas.names import name_tokens, normalise, skeleton, variant_group

__all__ = [
    "BLOCK_BUDGET",
    "COMMON_NAME_CODES",
    "MAX_BLOCK",
    "OPERATING_THRESHOLD",
    "PROFILE_VERSION",
    "REVIEW_THRESHOLD",
    "YEAR_TOLERANCE",
    "FieldAgreement",
    "Match",
    "Outcome",
    "Profile",
    "candidates",
    "name_code",
    "pair_score",
    "profile",
    "profile_from_json",
    "profile_to_json",
    "record_keys",
    "score",
    "usable_blocks",
]

REVIEW_THRESHOLD = 0.15
"""A pair at or above this is queued for a person: on `make bench` (bench/dedup_eval.py,
seeds 1-5) recall 0.92-0.93 of all true pairs (0.96 share a key), precision 0.90."""
OPERATING_THRESHOLD = 0.6
"""A pair at or above this is written by `dedup-file`: on the bench pair precision 0.98,
recall 0.81-0.82, F1 0.89 (issue 5 asks for precision >= 0.95 and F1 >= 0.85)."""
MAX_BLOCK = 200
"""`candidates` skips a key carried by more records than this (a phone a whole site gave,
a name pair as common as Mohamed Ali): such a block brings hundreds of candidates and
scarcely a duplicate the record's other keys miss (none at 53,000 records on the bench)."""
BLOCK_BUDGET = 250
"""`usable_blocks` takes a record's blocks smallest first (the rarest keys: documents,
phones, exact dates) until the records in them reach this: at a million records a
name-and-year key alone holds some 70, and a record with a dozen such keys brought
500 to 1,200 candidates. On 2,000 records of the 1M bench population this kept
1,462 of the 1,467 true pairs at or above the review threshold that blocking found
(one of the five lost scored above the operating threshold) and cut the 95th
percentile of candidates a record from 572 to 339."""
YEAR_TOLERANCE: Mapping[str, int] = {"exact": 0, "year": 1, "estimated": 3}
"""How many years a birth date of each precision may be off and still agree."""

Outcome = Literal["agree", "partial", "disagree", "missing"]
_Compared = tuple[Outcome, float, str]

_BIAS = 10.0  # log prior odds against a pair: about ln(20,000), a country office's caseload
_MAX_TOKENS = 8
_STRONG, _CLOSE = 0.9, 0.8  # token similarity: the same name / probably a typo of it
_COMMON = (
    "muhammad ahmed ali hassan hussein ibrahim abdullah omar osman musa adam yusuf idris"
    " abdelrahman fatima mariam aisha amina khadija rahman islam hossain uddin begum akter"
    " miah alam gebre tesfaye haile diallo traore camara mamadou santos reyes cruz maria jose"
)


@lru_cache(maxsize=1 << 16)
def name_code(token: str) -> str:
    """The phonetic code of one normalised name token: the skeleton of its variant
    group if it has one, else its own skeleton (Miah, Mia: ``m``), else the token."""
    group = variant_group(token)
    return skeleton(group if group is not None else token) or token


COMMON_NAME_CODES: frozenset[str] = frozenset(
    name_code(t) for word in _COMMON.split() for t in name_tokens(word)
)
"""Codes of names so frequent in the migration corridors that agreeing on one is weak
evidence and earns no name + birth-year key."""


@dataclass(frozen=True, slots=True)
class FieldAgreement:
    """How one field of two records compares, and what that weighed (log-odds)."""

    field: str
    outcome: Outcome
    weight: float
    detail: str


@dataclass(frozen=True, slots=True)
class Match:
    """The score of a pair in 0..1 and, field by field, why."""

    score: float
    explanation: tuple[FieldAgreement, ...]


# A profile is built for every candidate a check reads: named tuples, which are
# built several times faster than frozen dataclasses.
class _NameForm(NamedTuple):
    text: str  # as written, for explanations
    tokens: tuple[str, ...]
    given: int  # how many leading tokens are the given name


class _Birth(NamedTuple):
    year: int
    month: int
    day: int
    precision: str  # exact, year or estimated; an exact 1 January counts as 'year'

    def __str__(self) -> str:
        if self.precision == "exact":
            return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"
        return f"{self.year} ({self.precision})"


class Profile(NamedTuple):
    """A record read once for matching (`profile`): what `score` compares."""

    names: tuple[_NameForm, ...]
    birth: _Birth | None
    sex: str | None
    nationalities: frozenset[str]
    documents: frozenset[tuple[str, str, str]]  # (number, type, issuing country or "")
    phone: str | None
    place: str | None
    household: tuple[str, str] | None  # (group id, relationship)
    keys: frozenset[str]  # see `record_keys`


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _name_forms(names: Mapping[str, Any]) -> tuple[_NameForm, ...]:
    given, family = _text(names.get("given")), _text(names.get("family"))
    given_o, family_o = _text(names.get("given_original")), _text(names.get("family_original"))
    parts = [(given or given_o, family or family_o), (given_o or given, family_o or family)]
    parts += [(None, alias) for alias in map(_text, _items(names.get("aliases"))) if alias]
    forms: dict[tuple[str, ...], _NameForm] = {}
    for first, last in parts:
        text = " ".join(p for p in (first, last) if p)
        tokens = tuple(name_tokens(text)[:_MAX_TOKENS])
        if tokens and tokens not in forms:
            forms[tokens] = _NameForm(text, tokens, len(name_tokens(first or "")))
    return tuple(forms.values())


def _birth(value: Any) -> _Birth | None:
    if not isinstance(value, Mapping):  # shorthand: 1987-05-04, 1987 or ~1987
        value = {"value": value}
    raw, precision = value.get("value"), value.get("precision")
    text = raw.strip() if isinstance(raw, str) else ""
    if year := re.fullmatch(r"(~)?\s*(\d{4})", text):
        text, precision = f"{year[2]}-01-01", "estimated" if year[1] else precision or "year"
    try:
        day = date.fromisoformat(text)
    except ValueError:
        return None
    precision = precision if isinstance(precision, str) and precision in YEAR_TOLERANCE else "exact"
    if precision == "exact" and day.month == day.day == 1:
        precision = "year"  # what forms put when only the year is known
    return _Birth(day.year, day.month, day.day, precision)


def _ascii(text: Any, keep: str) -> str:
    """Letters and digits of `text` (Arabic-Indic digits too) as ASCII, for numbers."""
    if not isinstance(text, str):
        return ""
    text = "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in text)
    return re.sub(keep, "", unicodedata.normalize("NFKC", text).upper())


def _keys(
    codes: list[str], birth: _Birth | None, numbers: Iterable[str], phone: str | None
) -> frozenset[str]:
    keys = {f"d:{number}" for number in numbers} | ({f"p:{phone}"} if phone else set())
    keys.update(f"n:{a}+{b}" for i, a in enumerate(codes) for b in codes[i + 1 :])
    if len(codes) == 1 and len(codes[0]) >= 4 and codes[0] not in COMMON_NAME_CODES:
        keys.add(f"n:{codes[0]}")
    if birth is not None and birth.precision != "estimated":  # 7 years: too broad a block
        tolerance = YEAR_TOLERANCE[birth.precision]
        years = range(birth.year - tolerance, birth.year + tolerance + 1)
        rare = [c for c in codes if len(c) >= 2 and c not in COMMON_NAME_CODES]
        keys.update(f"y:{c}@{year}" for c in rare for year in years)
        if birth.precision == "exact":
            keys.update(f"b:{c}@{birth}" for c in codes)
    return frozenset(keys)


def profile(doc: Mapping[str, Any]) -> Profile:
    """Read a registration document once for matching and blocking.

    Never raises: a missing, mistyped or unparseable field is left out.
    """
    doc = _mapping(doc)
    forms = _name_forms(_mapping(doc.get("names")))
    codes = sorted({name_code(t) for form in forms for t in form.tokens})[: 2 * _MAX_TOKENS]
    sex = (_text(doc.get("sex")) or "").lower()
    documents = set()
    for item in map(_mapping, _items(doc.get("documents"))):
        number = _ascii(item.get("number"), r"[^0-9A-Z]")
        kind, country = _text(item.get("type")) or "", _text(item.get("issuing_country")) or ""
        if len(number) >= 5:  # shorter numbers identify nobody
            documents.add((number, kind.lower(), country.upper()))
    digits = _ascii(doc.get("phone"), r"\D")
    phone = digits[-8:] if len(digits) >= 8 else None
    household = _mapping(doc.get("household"))
    group, relation = _text(household.get("group_id")), _text(household.get("relationship"))
    birth = _birth(doc.get("date_of_birth"))
    nationalities = {n.upper() for n in map(_text, _items(doc.get("nationalities"))) if n}
    return Profile(
        names=forms,
        birth=birth,
        sex={"m": "male", "f": "female", "male": sex, "female": sex, "other": sex}.get(sex),
        nationalities=frozenset(nationalities),
        documents=frozenset(documents),
        phone=phone,
        place=normalise(_text(doc.get("place_of_birth")) or "") or None,
        household=(group, relation or "?") if group else None,
        keys=_keys(codes, birth, (number for number, _, _ in documents), phone),
    )  # fmt: skip


PROFILE_VERSION = 1
"""Bump whenever `profile` reads a record differently: profiles stored by the hub
under another version are made again (tests/test_matching.py pins the output)."""


def profile_to_json(p: Profile) -> list[Any]:
    """A profile as compact JSON (the hub keeps it sealed beside the record, so a
    candidate is not unsealed and read again whole); `profile_from_json` reverses it."""
    birth = p.birth
    return [
        [[n.text, list(n.tokens), n.given] for n in p.names],
        None if birth is None else [birth.year, birth.month, birth.day, birth.precision],
        p.sex,
        sorted(p.nationalities),
        sorted(list(d) for d in p.documents),
        p.phone,
        p.place,
        None if p.household is None else list(p.household),
        sorted(p.keys),
    ]


def profile_from_json(data: Any) -> Profile:
    """The profile `profile_to_json` wrote (raises ValueError on anything else)."""
    try:
        names, birth, sex, nationalities, documents, phone, place, household, keys = data
        return Profile(
            names=tuple([_NameForm(text, tuple(tokens), given) for text, tokens, given in names]),
            birth=None if birth is None else _Birth(*birth),
            sex=sex,
            nationalities=frozenset(nationalities),
            documents=frozenset([(a, b, c) for a, b, c in documents]),
            phone=phone,
            place=place,
            household=None if household is None else (household[0], household[1]),
            keys=frozenset(keys),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a stored match profile: {exc}") from None


def _as_profile(record: Mapping[str, Any] | Profile) -> Profile:
    return record if isinstance(record, Profile) else profile(record)


def record_keys(doc: Mapping[str, Any] | Profile) -> set[str]:
    """Return the blocking keys of a record (their kinds are in the module docstring)."""
    return set(_as_profile(doc).keys)


K = TypeVar("K", bound=str)


def usable_blocks(
    sizes: Mapping[K, int], *, max_block: int = MAX_BLOCK, budget: int = BLOCK_BUDGET
) -> list[K]:
    """The keys of one record whose blocks to search, given how many records
    each is filed for: none above `max_block`; of the rest the smallest first
    until their sizes add up to `budget` or more. Keys of one size are taken
    together, so the choice does not depend on how keys are spelt (the hub sees
    them blinded), and a record always gets its rarest blocks. The rarest keys
    carry the most evidence, so a check's cost stays bounded however common the
    record's names are."""
    by_size: dict[int, list[K]] = {}
    for key, size in sizes.items():
        by_size.setdefault(size, []).append(key)
    chosen: list[K] = []
    total = 0
    for size in sorted(by_size):
        if size > max_block or total >= budget:
            break
        chosen += sorted(by_size[size])
        total += size * len(by_size[size])
    return chosen


def candidates(
    keys: Iterable[str],
    index: Mapping[str, Collection[str]],
    *,
    max_block: int = MAX_BLOCK,
    budget: int = BLOCK_BUDGET,
) -> set[str]:
    """Return the ids filed under the `usable_blocks` of `keys` in `index`
    (key -> record ids). Keeps the record's own id."""
    sizes = {key: len(index[key]) for key in keys if key in index}
    found: set[str] = set()
    for key in usable_blocks(sizes, max_block=max_block, budget=budget):
        found.update(index[key])
    return found


@lru_cache(maxsize=1 << 18)
def _token_similarity(a: str, b: str) -> tuple[float, str]:
    if a == b:
        return 1.0, "same"
    code_a, code_b = name_code(a), name_code(b)
    text = DamerauLevenshtein.normalized_similarity(a, b)
    if code_a == code_b:
        group = variant_group(a)
        if group is not None and group == variant_group(b):
            return 0.95, f"variants of {group}"
        # Twins Hassan and Hussein share hsn but are spelt apart: only close.
        strong = len(code_a) >= 2 and text >= 0.6
        return max(text, 0.93 if strong else 0.85), f"same skeleton {code_a}"
    sound = 0.9 * DamerauLevenshtein.normalized_similarity(code_a, code_b)
    return max(text, sound), f"{a}/{b} close"


def _token_weight(code: str) -> float:
    # ln(m/u) with no index to count names: short codes are shared by different names
    # (Hassan, Hussein: hsn), and about one man in ten in the corridors is a Muhammad.
    if code in COMMON_NAME_CODES:
        return 1.5
    return 2.5 if len(code) <= 2 else 3.0 if len(code) == 3 else 4.0


def _compare_forms(
    a: _NameForm, b: _NameForm
) -> tuple[float, float, Outcome, tuple[str, ...], int]:
    """Align the tokens of two names, most alike first, in any order; return the
    evidence for (agreeing tokens) and against (conflicting or extra tokens), the
    outcome, notes, and how many tokens agreed only closely."""
    if a.tokens > b.tokens:  # one orientation: symmetric
        a, b = b, a
    return _compare_tokens(a.tokens, a.given, b.tokens, b.given)


@lru_cache(maxsize=1 << 16)
def _compare_tokens(
    x_tokens: tuple[str, ...], x_given: int, y_tokens: tuple[str, ...], y_given: int
) -> tuple[float, float, Outcome, tuple[str, ...], int]:
    # Names recur (households, common names, one person's variants): the same two
    # token sequences are compared again and again, so the answer is kept.
    similar: dict[tuple[int, int], tuple[float, str]] = {}
    pairs = []
    for i, s in enumerate(x_tokens):
        for j, t in enumerate(y_tokens):
            similar[i, j] = found = _token_similarity(s, t) if s <= t else _token_similarity(t, s)
            pairs.append((-found[0], i, j))
    pairs.sort()
    used_x: set[int] = set()
    used_y: set[int] = set()
    agreement, penalty, notes, order = 0.0, 0.0, [], []
    close = conflicts = 0
    for negative, i, j in pairs:
        if i in used_x or j in used_y:
            if len(used_x) == len(x_tokens) or len(used_y) == len(y_tokens):
                break  # one side is all aligned: the rest would be skipped too
            continue
        used_x.add(i)
        used_y.add(j)
        s, t = x_tokens[i], y_tokens[j]
        how = similar[i, j][1]
        if -negative >= _CLOSE:
            order.append((i, j))
            close += -negative < _STRONG
            share = 1.0 if -negative >= _STRONG else 0.6
            agreement += share * min(_token_weight(name_code(s)), _token_weight(name_code(t)))
            notes += [] if how == "same" else [how]
        else:
            conflicts += 1
            penalty -= 6.0 if -negative < 0.6 else 1.5  # another given name: another person
            notes.append(f"different {s}/{t}")
    extra = len(x_tokens) + len(y_tokens) - len(used_x) - len(used_y)
    penalty -= 0.3 * extra  # a father's name written on one record only
    notes += [f"{extra} name(s) on one side only"] if extra else []
    for tokens, given, aligned in ((x_tokens, x_given, used_x), (y_tokens, y_given, used_y)):
        if 0 < given < len(tokens) and order and not aligned & set(range(given)):
            penalty -= 3.0  # Jamal Adil Ahmad is not Ahmed Adel
            notes.append(f"given name {' '.join(tokens[:given])} unmatched")
    if len(order) > 1 and [j for _, j in sorted(order)] != sorted(j for _, j in order):
        penalty -= 1.0  # swapped on 1 record in 8, but Ahmed Mohamed's son is Mohamed Ahmed
        notes.append("order differs")
    outcome: Outcome = "partial" if close or conflicts or extra else "agree"
    outcome = outcome if order else "disagree"
    return min(agreement, 10.0), max(penalty, -8.0), outcome, tuple(notes), close


def _name_carriers(a: Profile, b: Profile, counts: Mapping[str, int] | None) -> int:
    """How many records carry the rarest name-pair key `a` and `b` share (at least
    2), or 0 when they share none or there are no `counts`."""
    if not counts:
        return 0
    shared = [counts.get(k, 2) for k in a.keys & b.keys if k[0] == "n"]
    return max(2, min(shared)) if shared else 0


def _carried_weight(carriers: int) -> float:
    # Term frequency: the other records carrying this name pair hold, on the
    # bench, about two more registrations of the same person for every one
    # who merely shares the name; the fewer carriers, the surer the match.
    return _BIAS - math.log((carriers - 1) / 2.0)


def _names_most(a: Profile, b: Profile, counts: Mapping[str, int] | None) -> float:
    """The most `_names(a, b, counts)` can weigh, found without comparing the
    names: its agreement is a shared name-pair key's weight by its carriers
    (never below 0, the most names that disagree outright weigh), else capped
    at 10; its penalty is never positive. `pair_score` relies on it
    (tests/test_matching.py checks it holds)."""
    return _most_by_carriers(_name_carriers(a, b, counts))


def _most_by_carriers(carriers: int) -> float:
    return max(0.0, _carried_weight(carriers)) if carriers else 10.0


def _names(a: Profile, b: Profile, shared: int, explain: bool = True) -> _Compared:
    """Compare the names; `shared` is `_name_carriers(a, b, counts)`."""
    if not a.names or not b.names:
        return "missing", 0.0, "no name on one side"
    found = [(*_compare_forms(fa, fb), fa, fb) for fa in a.names for fb in b.names]
    agreement, penalty, outcome, told, close, fa, fb = (
        found[0]
        if len(found) == 1
        else max(found, key=lambda f: (f[0] + f[1], -f[4], sorted((f[5].tokens, f[6].tokens))))
    )  # the best reading of both names; ties broken the same way whichever comes first
    carriers = 0
    if shared and outcome != "disagree":
        carriers = shared
        agreement = _carried_weight(carriers) - 2.0 * close
    if not explain:
        return outcome, agreement + penalty, ""
    notes = [*told, *[f"name pair carried by {carriers} records"] * bool(carriers)]
    skeletons = [n.removeprefix("same skeleton ") for n in notes if n.startswith("same skel")]
    notes = [n for n in notes if not n.startswith("same skel")]
    notes = [f"same skeleton {', '.join(skeletons)}"] * bool(skeletons) + notes
    detail = f"'{fa.text}' ~ '{fb.text}' ({'; '.join(notes) or 'same spelling'})"
    return outcome, agreement + penalty, detail


def _birth_dates(a: Profile, b: Profile, explain: bool = True) -> _Compared:
    x, y = a.birth, b.birth
    if x is None or y is None:
        return "missing", 0.0, "date of birth missing on one side"
    gap = abs(x.year - y.year)
    shown = f"{x} vs {y}" if explain else ""
    slack = YEAR_TOLERANCE[x.precision] + YEAR_TOLERANCE[y.precision]
    far = f"{shown} ({gap} years apart)" if explain else ""
    if gap > slack + 4:  # no slip of the pen and no estimate is that far off
        return "disagree", -8.0, far
    if x.precision == y.precision == "exact":
        if (x.month, x.day) == (y.month, y.day):
            return ("agree", 8.0, shown) if not gap else ("partial", 1.0, shown + " (year typo?)")
        if not gap:
            typo = (x.month, x.day) == (y.day, y.month) or x.month == y.month or x.day == y.day
            return ("partial", 2.0, shown + " (typo?)") if typo else ("disagree", -1.5, shown)
        return "disagree", -2.0 if gap == 1 else -4.0, far
    tolerance = max(YEAR_TOLERANCE[x.precision], YEAR_TOLERANCE[y.precision])
    vague = "estimated" in (x.precision, y.precision)
    if gap == 0:
        return "agree", 2.0 if vague else 3.5, shown + " (same year)" * explain
    if gap <= tolerance:
        return "agree", 1.0 if vague else 2.0, shown + f" (within {tolerance} year(s))" * explain
    if gap <= slack + 1:
        return "partial", 0.0, shown + " (near)"
    return "disagree", -2.5 if vague else -4.0, far


def _sex(a: Profile, b: Profile, explain: bool = True) -> _Compared:
    if a.sex is None or b.sex is None:
        return "missing", 0.0, "sex not recorded on one side"
    if a.sex == b.sex:
        return "agree", 0.1, f"both {a.sex}" if explain else ""  # the names told the sex
    if "other" in (a.sex, b.sex):
        return "partial", 0.0, f"{a.sex} vs {b.sex}"
    return "disagree", -5.0, f"{a.sex} vs {b.sex}"


def _nationalities(a: Profile, b: Profile, explain: bool = True) -> _Compared:
    if not a.nationalities or not b.nationalities:
        return "missing", 0.0, "nationality missing on one side"
    if a.nationalities.isdisjoint(b.nationalities):
        if not explain:
            return "disagree", -2.5, ""
        x, y = (", ".join(sorted(n)) for n in (a.nationalities, b.nationalities))
        return "disagree", -2.5, f"{x} vs {y}"
    shared = a.nationalities & b.nationalities if explain else ()
    return "agree", 0.2, "both " + ", ".join(sorted(shared))  # so did the names, mostly


def _documents(a: Profile, b: Profile, explain: bool = True) -> _Compared:
    if not a.documents or not b.documents:
        return "missing", 0.0, "no document number on one side"
    if same := sorted({d[0] for d in a.documents} & {d[0] for d in b.documents}):
        return "agree", 12.0, f"document {same[0]} on both"
    found: list[_Compared] = []
    for number, kind, country in a.documents:
        for other, other_kind, other_country in b.documents:
            if (kind, country) != (other_kind, other_country):
                continue
            pair = " vs ".join(sorted((number, other)))
            if DamerauLevenshtein.distance(number, other) == 1 and len(number) >= 6:
                found.append(("partial", 4.0, f"{kind} {pair} (one character apart)"))
            else:  # a new passport happens, so this is not decisive
                found.append(("disagree", -2.5, f"{kind} numbers differ: {pair}"))
    return max(found, key=lambda f: (f[1], f[2]), default=("missing", 0.0, "different kinds"))


def _phones(a: Profile, b: Profile, explain: bool = True) -> _Compared:
    if a.phone is None or b.phone is None:
        return "missing", 0.0, "phone missing on one side"
    if a.phone == b.phone:  # shared within a household: moderate evidence only
        return "agree", 3.0, f"same number ending {a.phone}"
    return "disagree", -0.7, "different numbers (phones change)"


def _places(a: Profile, b: Profile, explain: bool = True) -> _Compared:
    if a.place is None or b.place is None:
        return "missing", 0.0, "place of birth missing on one side"
    similarity = fuzz.token_set_ratio(a.place, b.place)
    shown = f"'{a.place}' vs '{b.place}'" if explain else ""
    if similarity >= 85:
        return "agree", 1.5, shown
    return ("partial", 0.0, shown) if similarity >= 60 else ("disagree", -0.7, shown)


def _households(a: Profile, b: Profile, explain: bool = True) -> _Compared:
    if a.household is None or b.household is None or a.household[0] != b.household[0]:
        return "missing", 0.0, "not registered in one household"
    roles = f"{a.household[1]}, {b.household[1]}"
    if a.household[1] == b.household[1] == "head":  # one household has one head
        return "partial", 0.0, "same household, both head"
    # A household is registered member by member: two of its records are two people.
    return "disagree", -15.0, f"members of one household ({roles})"


# Each compares one field of two profiles; with `explain=False` (`pair_score`) it
# leaves out the detail text, the larger part of its cost.
_FIELDS = (
    ("date_of_birth", _birth_dates),
    ("sex", _sex),
    ("nationalities", _nationalities),
    ("documents", _documents),
    ("phone", _phones),
    ("place_of_birth", _places),
    ("household", _households),
)


def score(
    a: Mapping[str, Any] | Profile,
    b: Mapping[str, Any] | Profile,
    *,
    key_counts: Mapping[str, int] | None = None,
) -> Match:
    """Compare two records field by field; return the score in 0..1 and its explanation.

    `key_counts` maps a blocking key to how many records carry it (the caller's
    index, both records included): an agreeing name then weighs by its rarity
    (two of the three Habtom Asmeroms are likelier one person than two of four
    hundred Mohamed Alis). Without it a name weighs by `COMMON_NAME_CODES` and
    length, more cautiously. The thresholds assume `key_counts`. Symmetric in
    `a` and `b` (but for the order of texts in details); a field missing on
    either side weighs 0. `profile` a record once to score it against many.
    """
    compared = _compare(_as_profile(a), _as_profile(b), key_counts)
    return Match(_chance(compared), tuple(FieldAgreement(*item) for item in compared))


def pair_score(
    a: Mapping[str, Any] | Profile,
    b: Mapping[str, Any] | Profile,
    *,
    key_counts: Mapping[str, int] | None = None,
    at_least: float = 0.0,
) -> float | None:
    """`score(a, b, key_counts=key_counts).score` without building the explanation,
    or None if that is below `at_least`: cheaper, for a caller that only keeps
    pairs at a threshold. When the other fields rule a pair out even with the most
    names of this pair can add (`_names_most`), the names are not compared at all."""
    pa, pb = _as_profile(a), _as_profile(b)
    weights = [compare(pa, pb, False)[1] for _, compare in _FIELDS]
    shared = _name_carriers(pa, pb, key_counts)
    if sum(weights) + _most_by_carriers(shared) < _least_total(at_least):
        return None  # the chance never falls as the total rises: the score is lower still
    weights.append(_names(pa, pb, shared, False)[1])
    value = _logistic(math.fsum(weights))
    return value if value >= at_least else None


@lru_cache(maxsize=16)
def _least_total(at_least: float) -> float:
    """A total of weights below which `_chance` is surely below `at_least`: the
    logit of `at_least`, less what rounding to 4 places and summing in another
    order could move (`pair_score` skips the names of a pair below it)."""
    lowest = at_least - 0.00006  # _chance rounds half up to 4 places at most this much
    return -math.inf if lowest <= 0 else _BIAS + math.log(lowest / (1 - lowest)) - 1e-9


def _compare(
    pa: Profile, pb: Profile, key_counts: Mapping[str, int] | None
) -> list[tuple[str, Outcome, float, str]]:
    return [
        ("names", *_names(pa, pb, _name_carriers(pa, pb, key_counts))),
        *((field, *compare(pa, pb)) for field, compare in _FIELDS),
    ]


def _chance(compared: list[tuple[str, Outcome, float, str]]) -> float:
    return _logistic(math.fsum(weight for _, _, weight, _ in compared))


def _logistic(total: float) -> float:
    """The chance of "one person" for a total of log-odds (exact sums: `math.fsum`)."""
    return round(1.0 / (1.0 + math.exp(_BIAS - total)), 4)
