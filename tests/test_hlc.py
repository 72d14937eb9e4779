from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync.hlc import Clock, ClockOverflow, Stamp

WALL_MAX = 2**48 - 1
COUNTER_MAX = 2**24 - 1
LAST = Stamp(WALL_MAX, COUNTER_MAX)  # ffffffffffffffffff


class FakeWall:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_stamps_follow_the_wall_clock() -> None:
    wall = FakeWall(1_000)
    clock = Clock(wall_ms=wall)
    assert clock.now() == Stamp(1_000, 0)
    wall.ms = 2_000
    assert clock.now() == Stamp(2_000, 0)


def test_clock_jumping_backwards_keeps_stamps_increasing() -> None:
    wall = FakeWall(10_000)
    clock = Clock(wall_ms=wall)
    first = clock.now()
    wall.ms = 5_000  # the device clock was set back by hand
    assert clock.now() == Stamp(10_000, 1)
    assert clock.now() > first


def test_clock_jumping_forwards_is_followed() -> None:
    wall = FakeWall(10_000)
    clock = Clock(wall_ms=wall)
    clock.now()
    wall.ms = 10_000 + 86_400_000
    assert clock.now() == Stamp(10_000 + 86_400_000, 0)


def test_restart_from_persisted_stamp_is_monotonic() -> None:
    wall = FakeWall(10_000)
    clock = Clock(wall_ms=wall)
    last = clock.now()
    wall.ms = 1_000  # rebooted with a wrong clock
    restarted = Clock(wall_ms=wall, last=Stamp.decode(last.encode()))
    assert restarted.now() > last


def test_observe_moves_past_remote() -> None:
    clock = Clock(wall_ms=FakeWall(1_000))
    remote = Stamp(5_000, 7)
    assert clock.observe(remote) > remote
    assert clock.now() > remote


def test_max_ahead_caps_a_remote_far_in_the_future() -> None:
    clock = Clock(wall_ms=FakeWall(1_000_000), max_ahead_ms=60_000)
    stamp = clock.observe(Stamp(1_000_000 + 86_400_000, 0))
    assert stamp.wall_ms <= 1_000_000 + 60_000


def test_counter_overflow_moves_the_wall_on() -> None:
    clock = Clock(wall_ms=FakeWall(1_000), last=Stamp(1_000, (1 << 24) - 1))
    assert clock.now() == Stamp(1_001, 0)


def test_a_full_counter_carries_into_the_next_millisecond() -> None:
    assert Stamp(1_000, 7).successor() == Stamp(1_000, 8)
    assert Stamp(1_000, COUNTER_MAX).successor() == Stamp(1_001, 0)
    assert Stamp(WALL_MAX, COUNTER_MAX - 1).successor() == LAST
    with pytest.raises(ClockOverflow):
        LAST.successor()


def test_the_clock_never_goes_past_the_last_stamp_the_format_holds() -> None:
    clock = Clock(wall_ms=FakeWall(1_000))
    with pytest.raises(ClockOverflow):
        clock.observe(LAST)  # it once became Stamp(2**48, 0): 19 digits, unreadable
    assert clock.last == Stamp(0, 0)  # unchanged
    assert clock.observe(Stamp(WALL_MAX, COUNTER_MAX - 1)) == LAST
    assert Stamp.decode(clock.last.encode()) == LAST
    with pytest.raises(ClockOverflow):
        clock.now()
    with pytest.raises(ClockOverflow):
        clock.observe(Stamp(5, 0))
    assert clock.last == LAST
    restarted = Clock(wall_ms=FakeWall(1_000), last=Stamp.decode(LAST.encode()))
    with pytest.raises(ClockOverflow):
        restarted.now()


def test_decode_refuses_garbage() -> None:
    for text in ["", "zz", "0" * 17, "G" * 18, "0000000003E8000000"]:
        try:
            Stamp.decode(text)
        except ValueError:
            continue
        raise AssertionError(f"accepted {text!r}")


walls = st.lists(st.integers(min_value=0, max_value=2**44), min_size=1, max_size=60)
events = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2**44),
        st.one_of(st.none(), st.builds(Stamp, st.integers(0, 2**44), st.integers(0, 1000))),
    ),
    min_size=1,
    max_size=60,
)


@given(events)
def test_stamps_strictly_increase_whatever_the_wall_and_remotes_do(
    evts: list[tuple[int, Stamp | None]],
) -> None:
    wall = FakeWall(0)
    clock = Clock(wall_ms=wall)
    previous = Stamp(0, 0)
    for ms, remote in evts:
        wall.ms = ms
        stamp = clock.now() if remote is None else clock.observe(remote)
        assert stamp > previous
        if remote is not None:
            assert stamp > remote
        previous = stamp


stamps = st.builds(
    Stamp, st.integers(WALL_MAX - 3, WALL_MAX), st.integers(COUNTER_MAX - 3, COUNTER_MAX)
)


@given(st.lists(st.one_of(st.none(), stamps), min_size=1, max_size=20))
def test_every_stamp_issued_at_the_end_of_the_range_encodes(remotes: list[Stamp | None]) -> None:
    clock = Clock(wall_ms=FakeWall(WALL_MAX - 2))
    for remote in remotes:
        try:
            stamp = clock.now() if remote is None else clock.observe(remote)
        except ClockOverflow:
            assert clock.last == LAST or remote == LAST
            continue
        assert Stamp.decode(stamp.encode()) == stamp


@given(
    st.builds(Stamp, st.integers(0, 2**48 - 1), st.integers(0, 2**24 - 1)),
    st.builds(Stamp, st.integers(0, 2**48 - 1), st.integers(0, 2**24 - 1)),
)
def test_encoding_round_trips_and_preserves_order(a: Stamp, b: Stamp) -> None:
    assert Stamp.decode(a.encode()) == a
    assert (a < b) == (a.encode() < b.encode())
