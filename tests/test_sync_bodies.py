"""The bodies inside envelopes (`sync.protocol`): push batches encode their body
once and exactly as the canonical form; acknowledgements and pull pages parse
strictly and round-trip; the hub sizes a pulled edit without encoding it."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from server.feed import edit_size
from server.sealing import COMPRESS_FROM, RecordCipher, SealError, compact_json, new_record_cipher
from sync.changes import Version
from sync.hlc import Stamp
from sync.protocol import (
    Ack,
    Edit,
    ProtocolError,
    PullPage,
    Released,
    batch_edits,
    cut_batch,
    dumps,
    loads,
)

PROPERTY = settings(database=None, deadline=None, max_examples=150)
RID = "0190a5a0-1111-7000-8000-000000000001"

texts = st.text(min_size=1, max_size=12)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
versions = st.builds(Version, st.builds(Stamp, st.integers(0, 2**40), st.integers(0, 99)), texts)


@st.composite
def edits(draw: st.DrawFn, *, numbered: bool = True) -> Edit:
    paths = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5, unique=True))
    based = draw(st.lists(st.sampled_from(paths), unique=True))
    return Edit(
        record_id=RID,
        version=draw(versions),
        operator=draw(texts),
        fields=tuple((p, draw(values)) for p in paths),
        bases={p: draw(versions) for p in based},
        first_seq=draw(st.integers(1, 10**6)) if numbered else None,
        hub_seq=None if numbered else draw(st.integers(1, 10**9)),
    )


@PROPERTY
@given(st.lists(edits(), min_size=1, max_size=8), st.integers(1, 3000))
def test_a_cut_batch_is_the_first_batch_with_its_canonical_body(
    items: list[Edit], max_bytes: int
) -> None:
    batch = cut_batch(iter(items), max_bytes)
    assert batch is not None
    assert batch.edits == next(batch_edits(items, max_bytes))
    assert batch.body == dumps({"edits": [e.to_json() for e in batch.edits]})
    assert len(batch.edits) == 1 or len(batch.body) <= max_bytes
    assert [Edit.from_json(e) for e in json.loads(batch.body)["edits"]] == (batch.edits)
    assert cut_batch(iter([]), max_bytes) is None


@PROPERTY
@given(edits(numbered=False))
def test_the_hub_sizes_a_pulled_edit_exactly(edit: Edit) -> None:
    wrapped, cipher = new_record_cipher(os.urandom(32), RID)
    assert isinstance(cipher, RecordCipher) and wrapped
    logged = {"f": edit.fields, "b": {p: b.to_json() for p, b in edit.bases.items()}}
    expected = len(dumps(edit.to_json()))
    # As the hub logs a change now (server.ingest), and as it did before.
    for sealed in (
        cipher.seal_json(compact_json(logged), "change"),
        cipher.seal(logged, "change"),
    ):
        assert edit_size(cipher.open_json(sealed, "change"), edit) == expected


@PROPERTY
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(alphabet=st.characters(exclude_categories=["Cs"])),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(alphabet=st.characters(exclude_categories=["Cs"])), inner)
        ),
        max_leaves=8,
    )
)
def test_compact_json_reads_back_as_the_value_and_matches_json_without_floats(
    value: Any,
) -> None:
    text = compact_json(value)
    assert json.loads(text) == value
    if not _has_float(value):
        assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and any(_has_float(v) for v in value)


def test_compact_json_writes_nan_and_infinity_as_json_dumps_does() -> None:
    value = [float("nan"), float("inf"), -float("inf")]
    assert compact_json(value) == json.dumps(value, separators=(",", ":")).encode()


def _parsed(parse: Any, text: bytes) -> tuple[str, str]:
    try:
        return "value", repr(parse(text))
    except ValueError:
        return "refused", ""


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1,"b":[true,false,null],"a":3}',
        b"123456789012345678901234567890",
        b"[-0, -0.0, 1e400, -1e400, 5e-324, 0.30000000000000004, 1E5, 1e-5]",
        b"[NaN, Infinity, -Infinity]",
        b'"\\ud83d\\ude00 \\u00e9 \xc3\xa9 \\/"',
        b'"\\ud800"',  # a lone surrogate: json reads it, pydantic-core does not
        b"\xef\xbb\xbf{}",  # a byte-order mark: json reads it
        b"[" * 300 + b"]" * 300,  # deeper than pydantic-core reads
        b" {} ",
        b"01",
        b"1.",
        b"+1",
        b"nan",
        b'"a\tb"',
        b'"\xff"',
        b"{} x",
        b"[1,]",
        b"",
    ],
)
def test_loads_reads_and_refuses_what_json_loads_does(text: bytes) -> None:
    assert _parsed(loads, text) == _parsed(json.loads, text)


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_loads_refuses_nesting_too_deep_for_json_as_a_value_error(depth: int) -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        loads(b'{"edits":' + b"[" * depth + b"]" * depth + b"}")


@PROPERTY
@given(values, st.booleans())
def test_loads_reads_what_dumps_writes(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert loads(text) == value


ACK = Ack(
    batch_id="1-30",
    high_water=30,
    is_duplicate=False,
    epoch="e1",
    hub_time_ms=1_700_000_000_000,
    superseded=(3,),
    conflicts=(3, 4),
    quarantined=((9, "field.invalid: sex: bad"),),
)


def test_ack_round_trips_and_ignores_what_a_newer_hub_adds() -> None:
    assert Ack.from_json(ACK.to_json()) == ACK
    assert Ack.from_json({**ACK.to_json(), "something_new": [1]}) == ACK


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"high_water": -1}, "high_water"),
        ({"high_water": "30"}, "high_water"),
        ({"duplicate": "no"}, "duplicate"),
        ({"epoch": ""}, "epoch"),
        ({"batch_id": 7}, "batch_id"),
        ({"superseded": [1, "2"]}, "superseded"),
        ({"conflicts": "3"}, "conflicts"),
        ({"quarantined": [[9]]}, "quarantined"),
        ({"quarantined": [["9", "x"]]}, "quarantined"),
    ],
)
def test_a_malformed_ack_is_refused_naming_what(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        Ack.from_json({**ACK.to_json(), **change})
    assert caught.value.code == "ack.malformed"
    assert named in caught.value.detail


released_spans = st.builds(
    lambda first, extra, outcomes: Released(first, first + extra, outcomes),
    st.integers(1, 10**6),
    st.integers(0, 20),
    st.dictionaries(st.text(max_size=8), st.sampled_from(["superseded", "conflict"]), max_size=3),
)


@PROPERTY
@given(
    st.lists(edits(numbered=False), max_size=4),
    st.text(max_size=20),
    st.booleans(),
    st.lists(released_spans, max_size=3),
)
def test_pull_page_round_trips(
    items: list[Edit], cursor: str, more: bool, released: list[Released]
) -> None:
    page = PullPage(items, cursor, more, "epoch-1", released=tuple(released))
    assert PullPage.from_json(json.loads(dumps(page.to_json()))) == page


def test_released_edits_are_optional_in_a_page_and_checked_when_present() -> None:
    good = PullPage([], "c", False, "e").to_json()
    assert "released" not in good and PullPage.from_json(good).released == ()
    bad: Any
    for bad in (
        {},
        [[1, 2]],
        [[0, 2, {}]],
        [[3, 2, {}]],
        [[1, 2, {"sex": 1}]],
        [[True, 2, {}]],
        [["1", 2, {}]],
    ):
        with pytest.raises(ProtocolError) as caught:
            PullPage.from_json({**good, "released": bad})
        assert caught.value.code == "page.malformed" and "released" in str(caught.value)


def test_a_malformed_pull_page_is_refused() -> None:
    good = PullPage([], "c", False, "e").to_json()
    change: dict[str, Any]
    for change in ({"edits": {}}, {"cursor": 3}, {"more": "yes"}, {"epoch": ""}):
        with pytest.raises(ProtocolError) as caught:
            PullPage.from_json({**good, **change})
        assert caught.value.code == "page.malformed"
    no_hub_seq = Edit(RID, Version(Stamp(1), "d"), "o", (("sex", "male"),)).to_json()
    with pytest.raises(ProtocolError, match="hub sequence"):
        PullPage.from_json({**good, "edits": [no_hub_seq]})
    with pytest.raises(ProtocolError) as caught:
        PullPage.from_json({**good, "edits": [{"r": "not-a-uuid"}]})
    assert caught.value.code == "edit.malformed"


@PROPERTY
@given(values, st.sampled_from(["state", "change"]))
def test_a_sealed_value_opens_as_it_was_compressed_or_not(value: Any, purpose: str) -> None:
    _, cipher = new_record_cipher(os.urandom(32), RID)
    padded = {"v": value, "pad": "x" * COMPRESS_FROM}  # past the threshold: compressed
    for item in (value, padded):
        text = json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
        assert cipher.open_json(cipher.seal_json(text, purpose), purpose) == text
        assert cipher.open(cipher.seal(item, purpose), purpose) == item


def test_sealing_compresses_long_json_and_still_opens_what_was_sealed_without() -> None:
    key = os.urandom(32)
    cipher = RecordCipher.from_data_key(key, RID)
    state = json.dumps(
        {f"f{i}": {"v": "Mohamed", "s": "01a22b6c3a7c000000", "d": RID} for i in range(20)}
    ).encode()
    sealed = cipher.seal_json(state, "state")
    assert len(sealed) < len(state) / 2
    # What a hub sealed before compression: the JSON encrypted as it was.
    nonce = os.urandom(12)
    old = nonce + AESGCM(key).encrypt(nonce, state, RID.encode() + b"\x00state")
    assert cipher.open_json(old, "state") == state
    with pytest.raises(SealError):
        cipher.open_json(sealed, "change")  # bound to its purpose, compressed or not
