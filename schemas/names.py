"""Personal names: normalisation, phonetic skeletons and match keys for duplicates.

Pure functions, no I/O. A name is normalised to lowercase ASCII, split into
tokens with Arabic particles and compounds resolved, and each token yields
index keys (`t:` token, `s:` skeleton, `v:` known variant group) that are
looked up by equality to find candidate duplicates cheaply; `name_similarity`
then ranks the candidates.

Skeleton rules (see `skeleton`), chosen so that Latin spellings and
unvocalised Arabic script meet:

* a leading vowel becomes the marker ``a`` (Ahmed ``ahmt``, Hamid ``hmt``);
  later vowels, ``y`` and a ``w`` not followed by a vowel are dropped;
* digraphs: sh/ch/sch -> ``x``, kh -> ``h``, gh -> ``g``, ph -> ``f``,
  th -> ``t``, dh -> ``d``, zh/dj -> ``j``, ck -> ``k``;
* letters: q/k/hard c -> ``k``, soft c/z/s -> ``s``, g/j -> ``j``,
  p/b -> ``b``, v/w -> ``w``, x -> ``h`` (Somali and Kurdish x is h/kh);
* a long u (u, ou, oo, w) just before the final consonant is kept as ``w``
  unless the vowel before it was a u too (Mahmoud ``mhmwt`` is not Mohamed
  ``mhmt``; Yusuf stays ``ysf`` like Youssef and Arabic ``ywsf``);
* ``ou`` before a vowel is the consonant ``w`` (Redouane); a final ``h`` that
  is not part of a digraph is dropped (Fatimah, Abdullah, Saleh);
* doubled letters collapse and a final ``d`` is devoiced to ``t`` (Ahmet).
"""

from __future__ import annotations

import re
import types
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

from anyascii import anyascii
from rapidfuzz import fuzz

__all__ = [
    "VARIANT_GROUPS",
    "match_keys",
    "name_similarity",
    "name_tokens",
    "normalise",
    "query_keys",
    "skeleton",
    "variant_group",
]

_CACHE_SIZE = 1 << 16
_MAX_KEY_CHARS = 32  # keys stay short even for garbage input

_ARABIC_ARTICLE = re.compile(r"\bال(?=\w)")
# Hamza, alif and ain at the start of an Arabic word carry the first vowel.
_ARABIC_VOWEL_SEAT = re.compile(r"(?<!\w)[\u0621\u0623\u0625\u0627\u0639\u0671]")
_APOSTROPHES = re.compile(r"['`\u2018\u2019\u02bb\u02bc\u02be\u02bf\u00b4\u2032]")
_NON_LETTERS = re.compile(r"[^a-z]+")

_CONNECTORS = frozenset(
    {"bin", "ben", "ibn", "bn", "abn", "bint", "binti", "bnt", "ould", "wad", "walad", "wld"}
)
_PARTICLES = frozenset(
    {"al", "el", "il", "ul", "ad", "adh", "an", "ar", "as", "ash", "at", "ath", "az"}
    | {"ed", "en", "er", "es", "et", "ez", "ud", "ur", "us", "ut"}
)
_ABD_WORDS = frozenset(
    {"abd", "abdal", "abdel", "abdil", "abdol", "abdoul", "abdul", "abdar", "abder", "abdur"}
    | {"abdas", "abdes", "abdus"}
)
_DIN_WORDS = frozenset(
    {"din", "deen", "dine", "dyn", "udin", "uddin", "uddeen", "eddin", "eddine", "addin"}
    | {"aldin", "eldin", "uldin", "oddin"}
)
_DIN_SUFFIXES = ("uddeen", "eddine", "uddin", "eddin", "addin", "oddin", "aldin", "eldin", "uldin")
_ALLAH = re.compile(r"l(?:a|ah|h|ahi|ai|ay|aye)$")

_UNIT = re.compile(r"sch|[cdgkpstz]h|ck|dj|[a-z]")
_VOWELS = frozenset("aeiou")
_CODES = {
    "sch": "x", "sh": "x", "ch": "x", "zh": "j", "kh": "h", "gh": "g", "ph": "f", "th": "t",
    "dh": "d", "ck": "k", "dj": "j", "b": "b", "p": "b", "d": "d", "f": "f", "g": "j", "h": "h",
    "j": "j", "k": "k", "l": "l", "m": "m", "n": "n", "q": "k", "r": "r", "s": "s", "t": "t",
    "v": "w", "w": "w", "x": "h", "y": "y", "z": "s",
}  # fmt: skip
_OU_GLIDE = re.compile(r"ou(?=[aei])")
_FINAL_H = re.compile(r"(?<=[aeiouybfhjlmnrw])h$")

VARIANT_GROUPS: Mapping[str, frozenset[str]] = types.MappingProxyType(
    {
        "muhammad": frozenset(
            {"muhammad", "mohamed", "mohammed", "mohammad", "muhammed", "mohamad", "muhamad"}
            | {"muhamed", "mouhamed", "mouhamad", "mohd", "md", "mhmd", "mohammd", "mukhammad"}
            | {"magomed", "mehmet", "mehmed", "mamadou", "mamadu", "mahamat", "mahamadou"}
            | {"muhammadu"}
        ),
        "ibrahim": frozenset(
            {"ibrahim", "ebrahim", "brahim", "ibrahima", "ibraheem", "ibrahem", "ibragim"}
            | {"abrhym"}
        ),
        "abdullah": frozenset(
            {"abdullah", "abdallah", "abdulla", "abdalla", "abdellah", "abdoulaye", "abdullahi"}
            | {"abdulahi", "abdoullah", "abdllh"}
        ),
        "yusuf": frozenset(
            {"yusuf", "youssef", "yousef", "yousif", "yousuf", "youcef", "yusef", "jusuf"}
            | {"youssouf", "yosef", "yusup", "ywsf"}
        ),
        "suleiman": frozenset(
            {"suleiman", "sulayman", "sulaiman", "suleyman", "souleymane", "sleiman", "soliman"}
            | {"sulejman", "slymn"}
        ),
        "uthman": frozenset(
            {"uthman", "othman", "osman", "usman", "ousmane", "otman", "outhman", "athmn"}
        ),
    }
)
"""Known transliteration variants the skeleton misses: canonical -> normalised spellings."""


@lru_cache(maxsize=_CACHE_SIZE)
def normalise(text: str) -> str:
    """Return `text` as lowercase ASCII words separated by single spaces.

    NFKC, Arabic article and vowel seats made explicit, any script
    transliterated with anyascii, diacritics gone; apostrophes are deleted
    (Sa'id -> said), other punctuation, digits and symbols become spaces.
    """
    text = unicodedata.normalize("NFKC", text)
    text = _ARABIC_ARTICLE.sub("al ", text).replace("\u0629", "a")  # ta marbuta
    text = _ARABIC_VOWEL_SEAT.sub("a", text)
    text = _APOSTROPHES.sub("", text)
    text = "".join(ch if unicodedata.category(ch)[0] in "LM" else " " for ch in text)
    text = anyascii(text).lower().replace("'", "").replace("`", "")
    return _NON_LETTERS.sub(" ", text).strip()


def _compound(token: str) -> str:
    """Canonical form of a fused abd- or -din compound (Abdelrahman -> abdrahman)."""
    if token.startswith("abd") and len(token) >= 5:
        rest = token[3:]
        rest = rest[2:] if rest.startswith("ou") else rest[1:] if rest[0] in _VOWELS else rest
        if len(rest) >= 2 and rest[0] == rest[1] and rest[0] in "lrstdnz":
            rest = rest[1:]  # assimilated article: Abdurrahman, Abdullah
        elif rest.startswith("l") and not _ALLAH.match(rest):
            rest = rest[1:]  # article: Abdelrahman, Abdulkarim
        if len(rest) >= 2:
            return "abd" + rest
    for suffix in _DIN_SUFFIXES:
        if token.endswith(suffix) and len(token) - len(suffix) >= 3:
            return token[: -len(suffix)] + "din"
    return token


@lru_cache(maxsize=_CACHE_SIZE)
def _tokens(text: str) -> tuple[str, ...]:
    raw = normalise(text).split()
    out: list[str] = []
    i = 0
    while i < len(raw):
        token, more = raw[i], i + 1 < len(raw)
        if (token in _CONNECTORS and len(raw) > 1) or (token in _PARTICLES and more):
            i += 1
            continue
        if token in _ABD_WORDS and more:  # Abd al-Rahman, Abdul Karim
            i += 1
            if raw[i] in _PARTICLES and i + 1 < len(raw):
                token, i = token + raw[i], i + 1
            token += raw[i]
        if token in _DIN_WORDS and out:  # Salah ad-Din, Kamal Uddin
            out[-1] += "din"
        else:
            token = _compound(token)
            if len(token) >= 2:
                out.append(token)
        i += 1
    return tuple(out)


def name_tokens(text: str) -> list[str]:
    """Return the normalised name tokens of `text`, in order.

    Particles (al-, el, ad-, ...) before a name are dropped, "son/daughter of"
    connectors (bin, ibn, ould, ...) are dropped, abd- compounds become one
    token (Abdel Rahman, Abd al-Rahman, Abdulrahman -> ``abdrahman``) and
    -din compounds join their first part (Salah ad-Din -> ``salahdin``).
    Tokens shorter than two letters are dropped.
    """
    return list(_tokens(text))


def _is_u(group: str) -> bool:
    return bool(group) and (group[-1] in "uw" or group.endswith("oo"))


@lru_cache(maxsize=_CACHE_SIZE)
def skeleton(token: str) -> str:
    """Return the consonant skeleton of one name token (rules in the module docstring).

    Mohamed, Muhammad, Mehmet and Arabic ``mhmd`` all give ``mhmt``.
    """
    word = normalise(token).replace(" ", "")
    word = _FINAL_H.sub("", _OU_GLIDE.sub("w", word))
    units = _UNIT.findall(word)
    seq: list[tuple[bool, str]] = []  # (is_vowel_group, letters or code)
    for i, unit in enumerate(units):
        after = units[i + 1][0] if i + 1 < len(units) else ""
        if unit in _VOWELS or (i and unit == "y") or (i and unit == "w" and after not in _VOWELS):
            if seq and seq[-1][0]:
                seq[-1] = (True, seq[-1][1] + unit)
            else:
                seq.append((True, unit))
        elif unit == "c":
            seq.append((False, "s" if after in ("e", "i", "y") else "k"))
        else:
            seq.append((False, _CODES[unit]))
    codes = ["a"] if seq and seq[0][0] else []
    codes += [code for vowel, code in seq if not vowel]
    if len(seq) >= 3 and not seq[-1][0] and seq[-2][0] and _is_u(seq[-2][1]):
        before = next((group for vowel, group in reversed(seq[:-2]) if vowel), "")
        if not _is_u(before):
            codes.insert(len(codes) - 1, "w")
    out: list[str] = []
    for code in codes:
        if not out or out[-1] != code:
            out.append(code)
    if out and out[-1] == "d" and not seq[-1][0]:
        out[-1] = "t"
    return "".join(out)


def _build_variant_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for canonical, spellings in VARIANT_GROUPS.items():
        for spelling in spellings | {canonical}:
            index[spelling] = canonical
            index[_compound(spelling)] = canonical
    return index


_VARIANT_INDEX = _build_variant_index()


def variant_group(token: str) -> str | None:
    """Return the canonical name of the `VARIANT_GROUPS` entry holding `token`, if any."""
    word = normalise(token).replace(" ", "")
    return _VARIANT_INDEX.get(word) or _VARIANT_INDEX.get(_compound(word))


@lru_cache(maxsize=_CACHE_SIZE)
def _token_keys(token: str) -> frozenset[str]:
    keys = {"t:" + token[:_MAX_KEY_CHARS]}
    code = skeleton(token)
    if len(code) >= 2:  # a one-letter skeleton would block half the database
        keys.add("s:" + code[:_MAX_KEY_CHARS])
    group = variant_group(token)
    if group is not None:
        keys.add("v:" + group)
    return frozenset(keys)


def match_keys(names: Iterable[str]) -> set[str]:
    """Return the index keys of a person with these names (``t:``, ``s:``, ``v:`` keys)."""
    if isinstance(names, str):
        names = (names,)
    keys: set[str] = set()
    for name in names:
        for token in _tokens(name):
            keys |= _token_keys(token)
    return keys


def query_keys(text: str) -> dict[str, set[str]]:
    """Map each token of a search text to the index keys it matches."""
    return {token: set(_token_keys(token)) for token in _tokens(text)}


@lru_cache(maxsize=_CACHE_SIZE)
def _phonetic(token: str) -> str:
    group = variant_group(token)
    return skeleton(group if group is not None else token) or token


def name_similarity(query: str, names: Sequence[str]) -> float:
    """Score 0..100 how well a search text matches a person's names, in any order.

    A blend of rapidfuzz's token_set_ratio on the tokens (weight 0.5) and on
    their phonetic codes (weight 0.4), plus up to 10 points for the share of
    tokens spelt exactly alike: an exact spelling ranks above a variant
    spelling, which ranks above a different name.
    """
    if isinstance(names, str):
        names = (names,)
    wanted = _tokens(query)
    have = tuple(dict.fromkeys(token for name in names for token in _tokens(name)))
    if not wanted or not have:
        return 0.0
    text = fuzz.token_set_ratio(" ".join(wanted), " ".join(have))
    sound = fuzz.token_set_ratio(
        " ".join(_phonetic(t) for t in wanted), " ".join(_phonetic(t) for t in have)
    )
    exact = len(set(wanted) & set(have)) / len(set(wanted) | set(have))
    return round(0.5 * text + 0.4 * sound + 10.0 * exact, 2)
