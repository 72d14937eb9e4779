"""A seeded, fault-injecting TCP proxy for HTTP/1.1 on 127.0.0.1, on asyncio.

The proxy runs its own event loop in a thread of its own, so synchronous tests
use it as a context manager and point a device at `proxy.url`:

    with FaultProxy(hub_port, plan, link=SlowLink(), seed=7) as proxy:
        ...

It reads just enough HTTP to see requests: a request head (method, path,
Content-Length) starts a request, and the answer bytes that follow it belong
to it (HTTP/1.1 clients such as httpx send a request only after the previous
answer: they never pipeline). For each request, `plan(request)` returns None
(forward it whole) or a fault:

- `Cut("up", at)`: forward `at` bytes of the request, then close both sides:
  the hub never sees the whole request.
- `Cut("down", at)`: forward `at` bytes of the answer, then close both sides:
  the hub answered (and may have committed), the device hears part of it.
- `LoseAnswer()`: forward the whole request; when the answer starts (so the
  hub has committed), close both sides without forwarding a byte of it.

`at` is a byte count, or a float in [0, 1): that fraction of the message
(head and Content-Length body). A cut at or past the message's end cannot
fire and the message goes through whole.

`link=SlowLink(...)` sends every connection through one shaped link shared by
all of them, as a device's one radio link is: a bandwidth limit each way, a
one-way delay, and stalls (pauses that close nothing) at byte offsets drawn
from `seed`, so the same seed stalls at the same places.

It counts bytes forwarded each way per request, per connection and in total,
requests per path, the faults that fired and the stalls. The plan runs on the
proxy's thread, one call at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ConnectionLog",
    "Cut",
    "Direction",
    "Fault",
    "FaultProxy",
    "LoseAnswer",
    "Plan",
    "Request",
    "RequestLog",
    "SlowLink",
]

Direction = Literal["up", "down"]
PIECE_BYTES = 4096  # read and shape this much at a time
MAX_HEAD_BYTES = 64 * 1024
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Cut:
    """Close the connection after `at` bytes of the request ("up") or answer ("down")."""

    direction: Direction
    at: int | float

    def budget(self, length: int | None) -> int | None:
        """Bytes to forward before closing, or None when the cut cannot fire."""
        if isinstance(self.at, float):
            if not 0.0 <= self.at < 1.0:
                raise ValueError(f"a fractional cut must be in [0, 1), not {self.at}")
            at = int(self.at * length) if length is not None else 0
        else:
            at = self.at
        return None if length is not None and at >= length else at


@dataclass(frozen=True)
class LoseAnswer:
    """Forward the whole request, then drop the connection as the answer starts."""


Fault = Cut | LoseAnswer


@dataclass(frozen=True)
class Request:
    """What a plan sees of a request: its head has arrived, its body not yet."""

    index: int  # over the whole proxy, in order of arrival, from 0
    connection: int
    method: str
    path: str  # without the query
    length: int  # head and Content-Length body


Plan = Callable[[Request], Fault | None]


@dataclass(frozen=True)
class SlowLink:
    """A shaped link: by default 256 kbit/s each way with a 600 ms round trip, and
    a stall of 1-3 s (both ways at once, as when a radio link fades) after every
    60-140 KB carried, the positions and lengths drawn from the proxy's seed."""

    bytes_per_s: float = 32_000.0
    one_way_delay_s: float = 0.3
    stall_gap_bytes: tuple[int, int] = (60_000, 140_000)  # (0, 0): never stall
    stall_s: tuple[float, float] = (1.0, 3.0)


@dataclass
class RequestLog:
    request: Request
    fault: Fault | None
    fired: bool = False  # the fault cut or dropped something
    up_bytes: int = 0  # forwarded to the hub
    down_bytes: int = 0  # forwarded to the device
    answered: bool = False  # the whole answer went through

    @property
    def fault_kind(self) -> str | None:
        """'up', 'down' or 'lost' for a fault that fired, else None."""
        if not self.fired or self.fault is None:
            return None
        return "lost" if isinstance(self.fault, LoseAnswer) else self.fault.direction


@dataclass
class ConnectionLog:
    index: int
    up_bytes: int = 0
    down_bytes: int = 0
    requests: list[RequestLog] = field(default_factory=list)


@dataclass(frozen=True)
class Stall:
    direction: Direction
    seconds: float


class _Shaper:
    """The shaped link: per direction a serializer at `bytes_per_s` then the delay;
    stalls at seeded byte offsets of everything carried, pausing both directions."""

    def __init__(self, link: SlowLink, rng: random.Random) -> None:
        self.link = link
        self.rng = rng
        self.free_at: dict[Direction, float] = {"up": 0.0, "down": 0.0}
        self.carried = 0
        self.stalls: list[Stall] = []
        self.next_stall = self._gap()

    def _gap(self) -> float:
        low, high = self.link.stall_gap_bytes
        return self.rng.uniform(low, high) if high > 0 else math.inf

    def schedule(self, direction: Direction, size: int, now: float) -> tuple[float, float]:
        """Put `size` bytes on the link; return (when this direction is free again,
        when they arrive at the far end)."""
        self.carried += size
        while self.carried >= self.next_stall:
            pause = self.rng.uniform(*self.link.stall_s)
            self.stalls.append(Stall(direction, pause))
            for way, free_at in self.free_at.items():
                self.free_at[way] = max(now, free_at) + pause
            self.next_stall += self._gap()
        start = max(now, self.free_at[direction])
        self.free_at[direction] = start + size / self.link.bytes_per_s
        return self.free_at[direction], self.free_at[direction] + self.link.one_way_delay_s


class _Close:
    """Queue marker: close the connection once everything before it is delivered."""


_CLOSE = _Close()
_Item = tuple[bytes, RequestLog | None, float] | _Close


def _head_fields(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    first, *lines = head[:-4].split(b"\r\n")
    fields: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    return first, fields


def _body_length(fields: dict[bytes, bytes]) -> int | None:
    if b"transfer-encoding" in fields:
        raise ValueError("the fault proxy reads only Content-Length bodies")
    value = fields.get(b"content-length")
    return int(value) if value is not None else None


class _Connection:
    """One proxied connection: two readers that apply faults and shape, two writers."""

    def __init__(
        self,
        proxy: FaultProxy,
        log: ConnectionLog,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.log = log
        self.client = client
        self.closed = asyncio.Event()
        # upstream: the request being read, and what is left of it
        self.up_head = bytearray()
        self.up_left = 0
        self.up_budget: int | None = None
        self.request: RequestLog | None = None
        # downstream: the answer being read
        self.answering: RequestLog | None = None
        self.down_head = bytearray()
        self.down_left: int | None = None
        self.down_budget: int | None = None

    async def run(self) -> None:
        reader, writer = self.client
        try:
            upstream = await asyncio.open_connection("127.0.0.1", self.proxy.target_port)
        except OSError:
            writer.close()
            return
        up: asyncio.Queue[_Item] = asyncio.Queue()
        down: asyncio.Queue[_Item] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._read(reader, up, "up")),
            asyncio.create_task(self._deliver(up, upstream[1], "up")),
            asyncio.create_task(self._read(upstream[0], down, "down")),
            asyncio.create_task(self._deliver(down, writer, "down")),
        ]
        try:
            await self.closed.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (writer, upstream[1]):
                w.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await w.wait_closed()

    # -- reading: faults and shaping ------------------------------------------------------
    async def _read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[_Item], direction: Direction
    ) -> None:
        shaper = self.proxy.shaper
        loop = asyncio.get_running_loop()
        try:
            while not self.closed.is_set():
                try:
                    data = await reader.read(PIECE_BYTES)
                except OSError:
                    break
                if not data:
                    break
                take = self._take_up if direction == "up" else self._take_down
                for piece, owner, cut in take(data):
                    if self.closed.is_set():
                        return
                    free_at = arrive_at = 0.0
                    if shaper is not None and piece:
                        free_at, arrive_at = shaper.schedule(direction, len(piece), loop.time())
                    queue.put_nowait((piece, owner, arrive_at))
                    if cut:
                        queue.put_nowait(_CLOSE)
                        return
                    # Read no faster than the link carries.
                    await asyncio.sleep(max(0.0, free_at - loop.time()))
        except ValueError:
            pass  # not HTTP the proxy can follow: close
        queue.put_nowait(_CLOSE)

    def _take_up(self, data: bytes) -> list[tuple[bytes, RequestLog | None, bool]]:
        """Split request bytes into (bytes to forward, their request, cut after them)."""
        out: list[tuple[bytes, RequestLog | None, bool]] = []
        while data:
            if self.up_left == 0:  # a new request: wait for its whole head
                self.up_head += data
                end = self.up_head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.up_head) > MAX_HEAD_BYTES:
                        raise ValueError("request head too long")
                    return out
                data, self.up_head = bytes(self.up_head), bytearray()
                self._start_request(data[: end + 4])
            piece, data = data[: self.up_left], data[self.up_left :]
            self.up_left -= len(piece)
            if self.up_budget is not None and len(piece) >= self.up_budget:
                assert self.request is not None
                self.request.fired = True
                out.append((piece[: self.up_budget], self.request, True))
                return out
            if self.up_budget is not None:
                self.up_budget -= len(piece)
            out.append((piece, self.request, False))
        return out

    def _start_request(self, head: bytes) -> None:
        first, fields = _head_fields(head)
        method, target, _ = first.decode("latin-1").split(" ", 2)
        length = len(head) + (_body_length(fields) or 0)
        request = self.proxy.new_request(self.log, method, target.split("?", 1)[0], length)
        self.request, self.answering = request, None
        self.up_left = length
        fault = request.fault
        self.up_budget = (
            fault.budget(length) if isinstance(fault, Cut) and fault.direction == "up" else None
        )

    def _take_down(self, data: bytes) -> list[tuple[bytes, RequestLog | None, bool]]:
        """Split answer bytes into (bytes to forward, their request, cut after them)."""
        request = self.request
        if request is not None and self.answering is not request:  # the answer starts
            if isinstance(request.fault, LoseAnswer):
                request.fired = True
                self.closed.set()  # drop it whole: the device hears nothing
                return []
            self.answering, self.down_left, self.down_budget = request, None, None
            self.down_head = bytearray()
        if self.answering is not None and self.down_left is None:
            self.down_head += data
            end = self.down_head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.down_head) > MAX_HEAD_BYTES:
                    raise ValueError("answer head too long")
                return []
            data, self.down_head = bytes(self.down_head), bytearray()
            _, fields = _head_fields(data[: end + 4])
            body = _body_length(fields)
            length = end + 4 + body if body is not None else None
            self.down_left = length if length is not None else -1
            fault = self.answering.fault
            if isinstance(fault, Cut) and fault.direction == "down":
                self.down_budget = fault.budget(length)
        owner = self.answering
        if self.down_budget is not None and len(data) >= self.down_budget:
            assert owner is not None
            owner.fired = True
            return [(data[: self.down_budget], owner, True)]
        if self.down_budget is not None:
            self.down_budget -= len(data)
        if owner is not None and self.down_left is not None and self.down_left >= 0:
            self.down_left = max(0, self.down_left - len(data))
            owner.answered = self.down_left == 0
        return [(data, owner, False)]

    # -- writing: delivery at the shaped time ---------------------------------------------
    async def _deliver(
        self, queue: asyncio.Queue[_Item], writer: asyncio.StreamWriter, direction: Direction
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Close):
                    break
                data, owner, arrive_at = item
                await asyncio.sleep(max(0.0, arrive_at - loop.time()))
                writer.write(data)
                await writer.drain()
                self.proxy.count(self.log, owner, direction, len(data))
        except OSError:
            pass
        self.closed.set()


class FaultProxy:
    """The proxy: `with FaultProxy(port, plan) as proxy:` serves on `proxy.url`."""

    def __init__(
        self,
        target_port: int,
        plan: Plan | None = None,
        *,
        link: SlowLink | None = None,
        seed: int = 0,
    ) -> None:
        self.target_port = target_port
        self.plan = plan
        self.link = link
        self.seed = seed
        self.shaper = _Shaper(link, random.Random(seed)) if link is not None else None
        self.port = 0
        self._lock = threading.Lock()
        self._connections: list[ConnectionLog] = []
        self._requests: list[RequestLog] = []
        self._live: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = started.result(START_TIMEOUT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(START_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=START_TIMEOUT_S)
        self._loop.close()

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for connection in list(self._live):
            connection.closed.set()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            log = ConnectionLog(len(self._connections))
            self._connections.append(log)
        connection = _Connection(self, log, (reader, writer))
        self._live.add(connection)
        try:
            await connection.run()
        finally:
            self._live.discard(connection)
            self._tasks.discard(task)

    # -- bookkeeping (called on the proxy's thread) -------------------------------------------
    def new_request(self, log: ConnectionLog, method: str, path: str, length: int) -> RequestLog:
        with self._lock:
            request = Request(len(self._requests), log.index, method, path, length)
        entry = RequestLog(request, self.plan(request) if self.plan is not None else None)
        with self._lock:
            self._requests.append(entry)
            log.requests.append(entry)
        return entry

    def count(
        self, log: ConnectionLog, owner: RequestLog | None, direction: Direction, size: int
    ) -> None:
        with self._lock:
            if direction == "up":
                log.up_bytes += size
                if owner is not None:
                    owner.up_bytes += size
            else:
                log.down_bytes += size
                if owner is not None:
                    owner.down_bytes += size

    # -- what a test reads --------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> list[ConnectionLog]:
        with self._lock:
            return list(self._connections)

    @property
    def requests(self) -> list[RequestLog]:
        with self._lock:
            return list(self._requests)

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded to the hub, over every connection."""
        with self._lock:
            return sum(c.up_bytes for c in self._connections)

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded to the device, over every connection."""
        with self._lock:
            return sum(c.down_bytes for c in self._connections)

    @property
    def stalls(self) -> list[Stall]:
        with self._lock:
            return list(self.shaper.stalls) if self.shaper is not None else []

    def requests_to(self, path: str) -> int:
        """How many requests for `path` (without query) reached the proxy."""
        return sum(1 for r in self.requests if r.request.path == path)

    def fired(self, path: str | None = None) -> list[RequestLog]:
        """The requests (for `path`, or any) whose fault cut or dropped something."""
        return [r for r in self.requests if r.fired and path in (None, r.request.path)]
