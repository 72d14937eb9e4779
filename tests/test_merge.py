"""Per-field merge: each rule by example, then the algebra and a sync simulation.

The simulation runs three devices (clocks a day behind, on time, a day ahead)
and one hub, and checks the hub's conflicts against the rule of DESIGN.md
("Clocks and merge") computed independently of `merge_field`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sync.changes import Version
from sync.hlc import Clock, Stamp
from sync.merge import Concurrent, Decision, FieldState, Outcome, merge_field

PROPERTY = settings(database=None, deadline=None, max_examples=200)
DAY_MS = 86_400_000
START_MS = 1_700_000_000_000
DEVICES = ("dev-a", "dev-b", "dev-c")
FIELDS = ("name", "phone", "site")
COMMON_VALUE = "same"


def version(wall_ms: int, device_id: str, counter: int = 0) -> Version:
    return Version(Stamp(wall_ms, counter), device_id)


A1 = version(100, "dev-a")
A2 = version(200, "dev-a")
A3 = version(300, "dev-a")
B1 = version(150, "dev-b")
B2 = version(250, "dev-b")


# --- the rules, one by one ---------------------------------------------------


def test_first_write_is_applied() -> None:
    incoming = FieldState("Amina", A1)
    decision = merge_field(None, incoming)
    assert decision.outcome is Outcome.APPLIED
    assert decision.state == incoming
    assert decision.conflict is None


def test_same_version_again_is_a_duplicate_and_keeps_the_field() -> None:
    current = FieldState("Amina", A1)
    for incoming in (current, FieldState("other text, same version", A1)):
        decision = merge_field(current, incoming)
        assert decision.outcome is Outcome.DUPLICATE
        assert decision.state == current
        assert decision.conflict is None


def test_higher_version_wins_whatever_the_arrival_order() -> None:
    older, newer = FieldState("old", A1, base=None), FieldState("new", A2, base=A1)
    forwards = merge_field(older, newer)
    assert forwards.outcome is Outcome.APPLIED
    assert forwards.state == newer
    backwards = merge_field(newer, older)
    assert backwards.outcome is Outcome.SUPERSEDED
    assert backwards.state == newer


def test_equal_stamps_are_ordered_by_device_id() -> None:
    from_a = FieldState("from a", version(500, "dev-a", counter=3))
    from_b = FieldState("from b", version(500, "dev-b", counter=3))
    assert merge_field(from_a, from_b).state == from_b
    assert merge_field(from_a, from_b).outcome is Outcome.APPLIED
    assert merge_field(from_b, from_a).state == from_b
    assert merge_field(from_b, from_a).outcome is Outcome.SUPERSEDED


def test_edit_based_on_the_current_version_is_sequential() -> None:
    current = FieldState("old", A1)
    incoming = FieldState("new", B1, base=A1)
    decision = merge_field(current, incoming)
    assert decision.outcome is Outcome.APPLIED
    assert decision.state == incoming
    assert decision.conflict is None


def test_edit_based_on_a_version_the_hub_never_saw_is_reviewed() -> None:
    # Its author saw A2, which the hub does not hold; whether A2 descended from
    # A1 cannot be proven, so a person reviews rather than the hub guessing.
    current = FieldState("old", A1)
    incoming = FieldState("new", B2, base=A2)
    decision = merge_field(current, incoming)
    assert decision.outcome is Outcome.APPLIED
    assert decision.state == incoming
    assert decision.conflict is not None


def test_late_arriving_parent_is_superseded_without_conflict() -> None:
    parent = FieldState("first", A1)
    child = FieldState("second", B1, base=A1)
    decision = merge_field(child, parent)
    assert decision.outcome is Outcome.SUPERSEDED
    assert decision.state == child
    assert decision.conflict is None


def test_late_arriving_grandparent_is_superseded_without_conflict() -> None:
    # A1 <- A2 <- A3: the field holds A3 (base A2 > A1) when A1 arrives.
    grandchild = FieldState("third", A3, base=A2)
    decision = merge_field(grandchild, FieldState("first", A1))
    assert decision.outcome is Outcome.SUPERSEDED
    assert decision.state == grandchild
    assert decision.conflict is None


@pytest.mark.parametrize("current_base", [None, A1])
def test_concurrent_writes_with_different_values_conflict(current_base: Version | None) -> None:
    # A2 and B2 both start from A1 (or from nothing): neither saw the other.
    lower = FieldState("from a", A2, base=current_base)
    higher = FieldState("from b", B2, base=current_base)
    for current, incoming, outcome in (
        (lower, higher, Outcome.APPLIED),
        (higher, lower, Outcome.SUPERSEDED),
    ):
        decision = merge_field(current, incoming)
        assert decision.outcome is outcome
        assert decision.state == higher
        assert decision.conflict == Concurrent(current=current, incoming=incoming)
        assert decision.conflict.winner == higher
        assert decision.conflict.loser == lower


def test_concurrent_writes_with_equal_values_do_not_conflict() -> None:
    lower = FieldState("Tripoli", A2, base=A1)
    higher = FieldState("Tripoli", B2, base=A1)
    assert merge_field(lower, higher).conflict is None
    assert merge_field(lower, higher).state == higher
    assert merge_field(higher, lower).conflict is None
    assert merge_field(higher, lower).state == higher


def test_concurrent_write_with_an_older_stamp_conflicts() -> None:
    # dev-b edits twice (B1, then B2 based on B1) and pushes; dev-a, offline all
    # along, had edited at 100 without seeing either. The hub holds B2.
    current = FieldState("b second", B2, base=B1)
    incoming = FieldState("a offline", A1, base=None)
    decision = merge_field(current, incoming)
    assert decision.state == current
    assert decision.conflict is not None


# --- the algebra -------------------------------------------------------------

stamps = st.builds(Stamp, st.integers(0, 6), st.integers(0, 2))
versions = st.builds(Version, stamps, st.sampled_from(DEVICES))
values = st.sampled_from(["x", "y", "z"])


@st.composite
def field_writes(draw: st.DrawFn) -> list[FieldState]:
    """Distinct writes to one field, each based on nothing or an older write."""
    chosen = sorted(draw(st.lists(versions, min_size=1, max_size=8, unique=True)))
    writes: list[FieldState] = []
    for i, v in enumerate(chosen):
        base = draw(st.none() | st.sampled_from(chosen[:i])) if i else None
        writes.append(FieldState(draw(values), v, base=base))
    return writes


def merge_all(writes: list[FieldState]) -> FieldState:
    state: FieldState | None = None
    for write in writes:
        state = merge_field(state, write).state
    assert state is not None
    return state


@PROPERTY
@given(writes=field_writes(), data=st.data())
def test_merge_is_order_independent(writes: list[FieldState], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(writes))
    winner = max(writes, key=lambda w: w.version)
    assert merge_all(shuffled) == winner
    assert merge_all(writes) == winner


@PROPERTY
@given(writes=field_writes(), data=st.data())
def test_merging_a_write_again_changes_nothing(
    writes: list[FieldState], data: st.DataObject
) -> None:
    *earlier, incoming = data.draw(st.permutations(writes))
    current = merge_all(earlier) if earlier else None
    first = merge_field(current, incoming)
    second = merge_field(first.state, incoming)
    assert second.state == first.state
    if first.outcome is Outcome.APPLIED:
        assert second.outcome is Outcome.DUPLICATE
        assert second.conflict is None
    else:
        # A superseded write cannot be recognised from the field alone: merging
        # it again gives the same decision, so callers dedupe by change id.
        assert second == first


# --- three devices and a hub -------------------------------------------------


@dataclass(frozen=True)
class Write:
    field: str
    state: FieldState


@dataclass(frozen=True)
class Edit:
    device: int
    field: str
    is_common_value: bool = False


@dataclass(frozen=True)
class Push:
    device: int


@dataclass(frozen=True)
class Pull:
    device: int


@dataclass(frozen=True)
class Tick:
    ms: int


Step = Edit | Push | Pull | Tick


@dataclass
class Device:
    name: str
    clock: Clock
    fields: dict[str, FieldState] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    pushed: int = 0  # how many of `writes` the hub has
    cursor: int = 0  # how much of the hub's log this device has pulled


class Simulation:
    """Devices edit and sync through one hub; the hub counts its conflicts."""

    def __init__(self, offsets_ms: tuple[int, int, int]) -> None:
        self.now_ms = 0
        self.devices = [
            Device(name, Clock(wall_ms=self._wall(offset)))
            for name, offset in zip(DEVICES, offsets_ms, strict=True)
        ]
        self.hub_fields: dict[str, FieldState] = {}
        self.hub_log: list[Write] = []
        self.hub_outcomes: list[Outcome] = []
        self.hub_conflicts: list[tuple[Write, Decision]] = []
        self.expected_conflicts: list[Write] = []
        self.all_writes: list[Write] = []

    def _wall(self, offset_ms: int) -> Callable[[], int]:
        return lambda: START_MS + offset_ms + self.now_ms

    def run(self, step: Step, *, is_serial: bool = False) -> None:
        match step:
            case Edit(device=i, field=name, is_common_value=is_common):
                if is_serial:  # whoever edits has seen every earlier edit
                    self.push_all()
                    self.pull(self.devices[i])
                self.edit(self.devices[i], name, is_common_value=is_common)
            case Push(device=i):
                self.push(self.devices[i])
            case Pull(device=i):
                self.pull(self.devices[i])
            case Tick(ms=ms):
                self.now_ms += ms

    def edit(self, device: Device, name: str, *, is_common_value: bool) -> None:
        held = device.fields.get(name)
        value = COMMON_VALUE if is_common_value else f"{device.name}-{len(self.all_writes)}"
        stamp = device.clock.now()
        seen = None if held is None else held.version
        write = Write(name, FieldState(value, Version(stamp, device.name), base=seen))
        device.fields[name] = write.state
        device.writes.append(write)
        self.all_writes.append(write)

    def push(self, device: Device) -> None:
        for write in device.writes[device.pushed :]:
            self._arrive_at_hub(write)
        device.pushed = len(device.writes)

    def push_all(self) -> None:
        for device in self.devices:
            self.push(device)

    def _arrive_at_hub(self, write: Write) -> None:
        held = self.hub_fields.get(write.field)
        # DESIGN.md: the hub's current version is not the one the author saw, and
        # the values differ -> the edits were concurrent.
        if (
            held is not None
            and write.state.base != held.version
            and held.value != write.state.value
        ):
            self.expected_conflicts.append(write)
        decision = merge_field(held, write.state)
        self.hub_fields[write.field] = decision.state
        self.hub_log.append(write)
        self.hub_outcomes.append(decision.outcome)
        if decision.conflict is not None:
            self.hub_conflicts.append((write, decision))

    def pull(self, device: Device) -> None:
        for write in self.hub_log[device.cursor :]:
            if write.state.version.device_id == device.name:
                continue  # its own write: already seen
            decision = merge_field(device.fields.get(write.field), write.state)
            device.fields[write.field] = decision.state
            device.clock.observe(write.state.version.stamp)
        device.cursor = len(self.hub_log)

    def finish(self) -> None:
        for _ in range(2):
            self.push_all()
            for device in self.devices:
                self.pull(device)


def held(fields: dict[str, FieldState]) -> dict[str, tuple[object, Version]]:
    return {name: (state.value, state.version) for name, state in fields.items()}


device_indexes = st.integers(0, len(DEVICES) - 1)
steps = st.lists(
    st.one_of(
        st.builds(
            Edit,
            device=device_indexes,
            field=st.sampled_from(FIELDS),
            is_common_value=st.integers(0, 7).map(lambda n: n == 0),
        ),
        st.builds(Push, device=device_indexes),
        st.builds(Pull, device=device_indexes),
        st.builds(Tick, ms=st.integers(0, 5_000)),
    ),
    max_size=40,
)
offsets = st.tuples(*[st.sampled_from([-DAY_MS, -1_000, 0, 1_000, DAY_MS])] * len(DEVICES))
SKEWED = (-DAY_MS, 0, DAY_MS)
# dev-b edits "phone" twice and pushes; dev-a (a day behind) edited it offline.
OFFLINE_EDIT_LOSES = [
    Edit(1, "phone"),
    Tick(10),
    Edit(1, "phone"),
    Push(1),
    Edit(0, "phone"),
    Push(0),
]


def simulate(offsets_ms: tuple[int, int, int], plan: list[Step], *, is_serial: bool) -> Simulation:
    sim = Simulation(offsets_ms)
    for step in plan:
        sim.run(step, is_serial=is_serial)
    sim.finish()
    return sim


def check_converged_and_nothing_lost(sim: Simulation) -> None:
    hub = held(sim.hub_fields)
    for device in sim.devices:
        assert held(device.fields) == hub, device.name
    # Every write reached the hub's log exactly once and was merged there.
    assert sorted(w.state.version for w in sim.hub_log) == sorted(
        w.state.version for w in sim.all_writes
    )
    assert len({w.state.version for w in sim.all_writes}) == len(sim.all_writes)
    assert set(sim.hub_outcomes) <= {Outcome.APPLIED, Outcome.SUPERSEDED}
    # Every write is the field's final winner or was superseded by a higher one.
    for write in sim.all_writes:
        winner = sim.hub_fields[write.field]
        assert write.state == winner or write.state.version < winner.version
    for name in {w.field for w in sim.all_writes}:
        assert sim.hub_fields[name] == max(
            (w.state for w in sim.all_writes if w.field == name), key=lambda s: s.version
        )


@PROPERTY
@given(offsets_ms=offsets, plan=steps)
@example(offsets_ms=SKEWED, plan=OFFLINE_EDIT_LOSES)
def test_devices_and_hub_converge(offsets_ms: tuple[int, int, int], plan: list[Step]) -> None:
    sim = simulate(offsets_ms, plan, is_serial=False)
    check_converged_and_nothing_lost(sim)
    counted = [write for write, _ in sim.hub_conflicts]
    # At most one conflict per write, and only for writes that were concurrent.
    assert len({w.state.version for w in counted}) == len(counted)
    assert {w.state.version for w in counted} <= {w.state.version for w in sim.expected_conflicts}
    for write, decision in sim.hub_conflicts:
        conflict = decision.conflict
        assert conflict is not None
        assert conflict.incoming == write.state
        assert conflict.winner == decision.state
        assert conflict.loser in (conflict.current, conflict.incoming)
        assert conflict.loser.version < conflict.winner.version


@PROPERTY
@given(offsets_ms=offsets, plan=steps)
@example(offsets_ms=SKEWED, plan=OFFLINE_EDIT_LOSES)
def test_hub_opens_one_conflict_per_concurrent_write(
    offsets_ms: tuple[int, int, int], plan: list[Step]
) -> None:
    sim = simulate(offsets_ms, plan, is_serial=False)
    counted = sorted(write.state.version for write, _ in sim.hub_conflicts)
    assert counted == sorted(write.state.version for write in sim.expected_conflicts)


@PROPERTY
@given(offsets_ms=offsets, plan=steps)
@example(offsets_ms=SKEWED, plan=OFFLINE_EDIT_LOSES)
def test_edits_that_never_overlap_open_no_conflicts(
    offsets_ms: tuple[int, int, int], plan: list[Step]
) -> None:
    sim = simulate(offsets_ms, plan, is_serial=True)
    check_converged_and_nothing_lost(sim)
    assert sim.expected_conflicts == []
    assert sim.hub_conflicts == []
