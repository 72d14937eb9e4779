"""Name normalisation, skeletons and match keys (schemas/names.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import names
from schemas.names import (
    VARIANT_GROUPS,
    match_keys,
    name_similarity,
    name_tokens,
    normalise,
    query_keys,
    skeleton,
    variant_group,
)


def shared(a: str, b: str) -> set[str]:
    return match_keys([a]) & match_keys([b])


def test_exports() -> None:
    assert sorted(names.__all__) == [
        "VARIANT_GROUPS",
        "match_keys",
        "name_similarity",
        "name_tokens",
        "normalise",
        "query_keys",
        "skeleton",
        "variant_group",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ahmed Abdel-Rahman", "ahmed abdel rahman"),
        ("محمد", "mhmd"),
        ("Müller", "muller"),
        ("  ÉLODIE   d’Arc ", "elodie darc"),
        ("Sa'id", "said"),
        ("ＭＯＨＡＭＥＤ", "mohamed"),  # fullwidth, folded by NFKC
        ("Straße", "strasse"),
        ("ተስፋዬ", "tesfaye"),
        ("Мухаммад", "mukhammad"),
        ("علي", "aly"),  # a word-initial ain carries a vowel
        ("فاطمة", "ftma"),  # ta marbuta is a vowel
        ("عبد الرحمن", "abd al rhmn"),  # the article is split off
        ("Jean_Pierre/Paul.", "jean pierre paul"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


@pytest.mark.parametrize(
    "text", ["", "   ", "!!!", "-- ' --", "12345", "٣٤", "😀🙂", "\x00\t\n", "★ ½ ©"]
)
def test_garbage_gives_nothing(text: str) -> None:
    assert normalise(text) == ""
    assert name_tokens(text) == []
    assert match_keys([text]) == set()
    assert query_keys(text) == {}
    assert skeleton(text) == ""
    assert name_similarity(text, ["Mohamed Ali"]) == 0.0
    assert name_similarity("Mohamed", [text]) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("al-Amin", ["amin"]),
        ("el Sayed", ["sayed"]),
        ("Hassan Al Tayeb", ["hassan", "tayeb"]),
        ("Nasser ash-Shami", ["nasser", "shami"]),
        ("Ahmed bin Salman", ["ahmed", "salman"]),
        ("Omar ibn Khattab", ["omar", "khattab"]),
        ("Mohamed Ould Abdelaziz", ["mohamed", "abdaziz"]),
        ("Ali Wad Ahmed", ["ali", "ahmed"]),
        ("Ahmed Abdel-Rahman", ["ahmed", "abdrahman"]),
        ("Tesfaye Gebre Mariam", ["tesfaye", "gebre", "mariam"]),
        ("Abdi Hassan", ["abdi", "hassan"]),  # Abdi alone is a given name
        ("Al", ["al"]),  # a particle with nothing after it is kept
        ("Ben", ["ben"]),
        ("J. R. Mohamed", ["mohamed"]),  # one-letter tokens dropped
    ],
)
def test_name_tokens(text: str, expected: list[str]) -> None:
    assert name_tokens(text) == expected


@pytest.mark.parametrize(
    "group",
    [
        [
            "Abdel Rahman",
            "Abdul-Rahman",
            "Abd al-Rahman",
            "Abdelrahman",
            "Abdulrahman",
            "Abdurrahman",
            "Abdur Rahman",
            "Abdirahman",
            "Abd-El-Rahman",
        ],
        ["Abdullah", "Abdallah", "Abd Allah", "Abdellah"],
        ["Abdelaziz", "Abdul Aziz", "Abd al-Aziz"],
        ["Salah ad-Din", "Salahuddin", "Salah Eddine", "Salah El Din", "Salaheldin"],
    ],
)
def test_compounds_become_one_token(group: list[str]) -> None:
    tokens = {tuple(name_tokens(text)) for text in group}
    assert len(tokens) == 1
    assert len(tokens.pop()) == 1


@pytest.mark.parametrize(
    "group",
    [
        ["Abdel Rahman", "Abdelrahman", "Abderrahmane", "عبد الرحمن", "عبدالرحمن"],
        ["Abdullah", "Abdulla", "عبد الله", "عبدالله"],
        ["Abdelaziz", "عبد العزيز", "عبدالعزيز"],
        ["Salah ad-Din", "صلاح الدين"],
    ],
)
def test_compounds_share_a_skeleton_across_scripts(group: list[str]) -> None:
    skeletons = {tuple(skeleton(t) for t in name_tokens(text)) for text in group}
    assert len(skeletons) == 1


@pytest.mark.parametrize(
    "group",
    [
        [
            "Mohamed",
            "Muhammad",
            "Mohammed",
            "Mohammad",
            "Muhammed",
            "Mohamad",
            "محمد",
            "মোহাম্মদ",
            "Мухаммад",
            "Mehmet",
        ],
        ["Hussein", "Husain", "Hussain", "Hosein", "Houssein", "حسين"],
        ["Ahmed", "Ahmad", "Ahmet", "أحمد"],
        ["Youssef", "Yusuf", "Yousef", "Youcef", "Yousuf", "Youssouf", "يوسف"],
        ["Fatima", "Fatma", "Fatimah", "فاطمة"],
        ["Ali", "Aly", "علي"],
        ["Mustafa", "Moustafa", "Mostafa", "Mustapha", "مصطفى"],
        ["Osman", "Usman", "Ousmane"],
        ["Othman", "Uthman", "عثمان"],
        ["Tesfaye", "Tesfay", "ተስፋዬ"],
        ["Ibrahim", "Ebrahim", "Ibraheem", "إبراهيم"],
        ["Mahmoud", "Mahmud", "Mahmood", "Mahmut", "محمود"],
        ["Mansour", "Mansur", "Mansoor", "منصور"],
        ["Dawud", "Daoud", "Dawood", "داود"],
        ["Osama", "Usama", "أسامة", "اسامة"],
        ["Khalid", "Khaled", "Halit", "Xalid", "خالد"],
        ["Jamal", "Gamal", "Djamel", "جمال"],
        ["Qasim", "Kassem", "Kasim", "قاسم"],
    ],
)
def test_skeleton_equivalences(group: list[str]) -> None:
    assert len({skeleton(name) for name in group}) == 1, {n: skeleton(n) for n in group}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Mohamed", "Mahmoud"),
        ("Muhammad", "محمود"),
        ("محمد", "Mahmud"),
        ("Ali", "Ahmed"),
        ("Ahmed", "Hamid"),
        ("Fatima", "Fadi"),
        ("Mustafa", "Mansour"),
        ("Nour", "Noura"),
        ("Youssef", "Joseph"),
    ],
)
def test_different_names_share_no_key(a: str, b: str) -> None:
    assert shared(a, b) == set()


@pytest.mark.parametrize(
    ("token", "group"),
    [
        ("Mohamed", "muhammad"),
        ("Mamadou", "muhammad"),
        ("Mohd", "muhammad"),
        ("Md", "muhammad"),
        ("Mehmet", "muhammad"),
        ("Brahim", "ibrahim"),
        ("Ibrahima", "ibrahim"),
        ("Abdoulaye", "abdullah"),
        ("Abdullahi", "abdullah"),
        ("عبدالله", "abdullah"),
        ("Jusuf", "yusuf"),
        ("Yousif", "yusuf"),
        ("Souleymane", "suleiman"),
        ("Osman", "uthman"),
        ("عثمان", "uthman"),
        ("Mahmoud", None),
        ("Joseph", None),
        ("Solomon", None),
        ("", None),
    ],
)
def test_variant_group(token: str, group: str | None) -> None:
    assert variant_group(token) == group


def test_variant_groups_hold_normalised_spellings() -> None:
    for canonical, spellings in VARIANT_GROUPS.items():
        assert canonical in spellings
        assert all(normalise(s) == s and " " not in s for s in spellings)


@pytest.mark.parametrize(
    "record",
    ["Mohamed", "Mohammed", "محمد", "মোহাম্মদ", "Мухаммад", "Mehmet", "Mamadou", "Md", "Mohd"],
)
def test_muhammad_query_finds_every_spelling(record: str) -> None:
    assert shared("Muhammad", record)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Tesfay", "ተስፋዬ"),
        ("Hussein", "حسين"),
        ("Brahim", "إبراهيم"),
        ("Osman", "Othman"),
        ("Youssef", "Jusuf"),
        ("Abdel Rahman", "عبد الرحمن"),
        ("Abdoulaye", "Abdullah"),
    ],
)
def test_variants_share_a_key(a: str, b: str) -> None:
    assert shared(a, b)


def test_match_keys_format() -> None:
    keys = match_keys(["Mohamed", "Abdel Rahman", "x" * 500])
    assert {"t:mohamed", "s:mhmt", "v:muhammad", "t:abdrahman", "s:abdrhmn"} <= keys
    assert all(k.isascii() and k[:2] in ("t:", "s:", "v:") and len(k) <= 34 for k in keys)


def test_match_keys_takes_one_string_as_one_name() -> None:
    assert match_keys("Mohamed Ali") == match_keys(["Mohamed", "Ali"])


def test_query_keys_lets_a_caller_count_matched_tokens() -> None:
    wanted = query_keys("Muhammad Abd al-Rahman Hussein")
    assert set(wanted) == {"muhammad", "abdrahman", "hussein"}
    record = match_keys(["محمد", "عبد الرحمن"])
    matched = {token for token, keys in wanted.items() if keys & record}
    assert matched == {"muhammad", "abdrahman"}


def test_similarity_ranks_exact_above_variant_above_other_name() -> None:
    exact = name_similarity("Mohamed", ["Mohamed", "Ali"])
    variant = name_similarity("Mohamed", ["Muhammad", "Ali"])
    other = name_similarity("Mohamed", ["Mahmoud", "Ali"])
    assert exact > variant > other


@pytest.mark.parametrize(
    ("query", "record"),
    [
        ("Mohamed Ali", ["Ali", "Mohamed"]),
        ("Abdel Rahman Hussein", ["Hussein", "Abdelrahman"]),
        ("Tesfaye Gebre", ["Gebre Tesfaye"]),
    ],
)
def test_similarity_ignores_name_order(query: str, record: list[str]) -> None:
    assert name_similarity(query, record) == 100.0


def test_similarity_across_scripts_and_spellings() -> None:
    query = "Mohamed Abdel Rahman"
    arabic = name_similarity(query, ["محمد", "عبد الرحمن"])
    spelling = name_similarity(query, ["Muhammad", "Abd al-Rahman"])
    unrelated = name_similarity(query, ["Tesfaye", "Gebre"])
    assert arabic > 70 and spelling > 70
    assert unrelated < 40


def test_similarity_is_bounded() -> None:
    for names_ in (["Mohamed"], ["Mohamed", "Mohamed"], ["Ali Mohamed", "Mohamed Ali"]):
        assert 0.0 <= name_similarity("Mohamed Ali", names_) <= 100.0


@settings(database=None, max_examples=300)
@given(st.text())
def test_normalise_is_idempotent(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once
    assert once.isascii()


@settings(database=None, max_examples=300)
@given(st.lists(st.text(), max_size=4))
def test_match_keys_never_raises_and_is_ascii(texts: list[str]) -> None:
    keys = match_keys(texts)
    assert all(isinstance(k, str) and k.isascii() and 3 <= len(k) <= 34 for k in keys)
    assert 0.0 <= name_similarity(" ".join(texts), texts) <= 100.0
