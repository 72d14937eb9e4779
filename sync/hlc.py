"""Hybrid logical clocks (Kulkarni et al.): wall time plus a counter.

A stamp orders events across devices even when their clocks disagree: it never
goes backwards on one device (even if the wall clock does), and after a device
observes a remote stamp its next stamp is greater. The wall clock is injected,
so tests can jump it around; persistence is the caller's job (store `last`
with the change it stamped, restore it with `Clock(last=...)`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["Clock", "ClockOverflow", "Stamp", "system_ms"]

_WALL_HEX = 12  # 48 bits of milliseconds: good until the year 10889
_COUNTER_HEX = 6
_COUNTER_MAX = (1 << (4 * _COUNTER_HEX)) - 1
_WALL_MAX = (1 << (4 * _WALL_HEX)) - 1


class ClockOverflow(ValueError):
    """No stamp the format holds is above this one: the clock cannot go on.

    Only a stamp from a clock set thousands of years ahead gets here; the hub
    refuses edits stamped far ahead, so none should reach a device.
    """


def system_ms() -> int:
    """The system wall clock in Unix milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, order=True, slots=True)
class Stamp:
    """One HLC stamp; compares by (wall_ms, counter)."""

    wall_ms: int
    counter: int = 0

    def encode(self) -> str:
        """Fixed-width lower-case hex: string order equals stamp order (good for SQL)."""
        return f"{self.wall_ms:0{_WALL_HEX}x}{self.counter:0{_COUNTER_HEX}x}"

    @classmethod
    def decode(cls, text: str) -> Stamp:
        """Parse `encode()` output; raise ValueError on anything else."""
        if len(text) != _WALL_HEX + _COUNTER_HEX or text != text.lower():
            raise ValueError(f"not an HLC stamp: {text!r}")
        try:
            return cls(int(text[:_WALL_HEX], 16), int(text[_WALL_HEX:], 16))
        except ValueError:
            raise ValueError(f"not an HLC stamp: {text!r}") from None

    def successor(self) -> Stamp:
        """The least stamp above this one: the next counter, or with the counter
        full the next millisecond. Raises `ClockOverflow` past the last stamp."""
        if self.counter < _COUNTER_MAX:
            return Stamp(self.wall_ms, self.counter + 1)
        if self.wall_ms >= _WALL_MAX:
            raise ClockOverflow(f"no stamp follows {self.encode()}")
        return Stamp(self.wall_ms + 1, 0)

    def isoformat(self) -> str:
        """Human form: the wall time in UTC and the counter."""
        when = datetime.fromtimestamp(self.wall_ms / 1000, UTC)
        return f"{when.strftime('%Y-%m-%dT%H:%M:%S')}.{self.wall_ms % 1000:03d}Z#{self.counter}"

    def __str__(self) -> str:
        return self.encode()


ZERO = Stamp(0, 0)


class Clock:
    """A hybrid logical clock.

    `max_ahead_ms`, when set, stops the clock from following a remote stamp
    more than that far ahead of the local wall clock (the hub uses 60 s, so a
    device with a clock set a year ahead cannot drag the hub's time with it).
    """

    def __init__(
        self,
        *,
        wall_ms: Callable[[], int] = system_ms,
        last: Stamp = ZERO,
        max_ahead_ms: int | None = None,
    ) -> None:
        self._wall_ms = wall_ms
        self._last = last
        self._max_ahead_ms = max_ahead_ms

    @property
    def last(self) -> Stamp:
        """The latest stamp issued or observed; persist it to survive restarts."""
        return self._last

    def now(self) -> Stamp:
        """Return a stamp for a local event, greater than every earlier one
        (`ClockOverflow` if the clock is at the very last stamp)."""
        return self._advance(self._wall_ms(), ZERO)

    def observe(self, remote: Stamp) -> Stamp:
        """Take a remote stamp into account; return a stamp greater than both.

        Raises `ClockOverflow`, changing nothing, when no stamp the format
        holds is greater (`remote` is the very last one)."""
        wall = self._wall_ms()
        if self._max_ahead_ms is not None and remote.wall_ms > wall + self._max_ahead_ms:
            remote = Stamp(wall + self._max_ahead_ms, remote.counter)
        return self._advance(wall, remote)

    def _advance(self, wall: int, remote: Stamp) -> Stamp:
        last = self._last
        top = max(wall, last.wall_ms, remote.wall_ms)
        if top == last.wall_ms == remote.wall_ms:
            counter = max(last.counter, remote.counter) + 1
        elif top == last.wall_ms:
            counter = last.counter + 1
        elif top == remote.wall_ms:
            counter = remote.counter + 1
        else:
            counter = 0
        if counter > _COUNTER_MAX:  # millions of events within one frozen millisecond
            top, counter = top + 1, 0
        if top > _WALL_MAX:  # never a stamp `encode` cannot write in its 18 digits
            raise ClockOverflow(f"the clock cannot go past {Stamp(_WALL_MAX, _COUNTER_MAX)}")
        self._last = Stamp(top, counter)
        return self._last
