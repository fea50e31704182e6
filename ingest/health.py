"""Station health: every imported station's up/down state and each change of it.

A station is up while its retained `status` is `online` and it has been heard
(heartbeat, reads or status) within its timeout; down otherwise, with a cause:

    never    provisioned (imported) and not heard from since
    offline  its status is `offline` (its Last Will, or said so), or it never said `online`
    silent   `online`, but not heard within its timeout

The timeout is the station's own (stations CSV column `timeout_s`), else its
zone's (`zone_timeouts`), else the fleet default (`heartbeat_timeout_s`, three
heartbeat intervals): one global timeout is wrong for sites with different radios.

Events move a station at their own time: a heartbeat, a read batch or `online`
brings it up at once. Silence is found by `tick`, which pops stations whose
deadline has passed from a heap (one entry per station, so a heartbeat costs
no heap work) and dates the change at the deadline itself, last heard +
timeout, not at the tick: the history says when the station went quiet. A
grace of two seconds keeps a heartbeat that was received before its deadline,
and is still on its way through the pipeline, from making a stale outage.

Times only move forward: a change is dated max(event, the last change), and
last-heard times are max(old, new), so a late heartbeat never moves a station
back. Each change goes to `pending` (stored by `ingest.health_store`, never
rewritten) and to `events` (the operators' notifications, `{root}/health/{zone}`);
a station still down is reported again every `down_repeat_s`. A station with
more than `flap_transitions` changes within `flap_window_s` is flapping.

Only the event loop touches this state; `/metrics` reads it there too, through
`views`.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from ingest.config import Settings
from registry.stations import StationInfo
from registry.targets import Target, Targets

UP, NEVER, OFFLINE, SILENT = "online", "never", "offline", "silent"
CAUSES = (NEVER, OFFLINE, SILENT)
GRACE_MS = 2_000


@dataclass(slots=True, frozen=True)
class HealthPolicy:
    default_timeout_ms: int = 90_000
    zone_timeout_ms: Mapping[str, int] = field(default_factory=dict)
    flap_limit: int = 6
    flap_window_ms: int = 3_600_000
    repeat_ms: int = 3_600_000
    stages: tuple[tuple[int, float], ...] = ()  # configured targets; () for the default

    @classmethod
    def from_settings(cls, s: Settings) -> HealthPolicy:
        return cls(int(s.heartbeat_timeout_s * 1000),
                   {zone: int(sec * 1000) for zone, sec in s.zone_timeouts},
                   s.flap_transitions, int(s.flap_window_s * 1000), int(s.down_repeat_s * 1000),
                   tuple(s.uptime_stages()))

    def timeout_ms(self, info: StationInfo) -> int:
        if info.timeout_s is not None:
            return int(info.timeout_s * 1000)
        return self.zone_timeout_ms.get(info.zone, self.default_timeout_ms)


@dataclass(slots=True)
class StationState:
    status: str | None = None
    status_ms: int | None = None
    last_heard_ms: int | None = None
    last_read_ms: int | None = None
    up: bool | None = None      # None: not provisioned yet, no transition stored
    cause: str = NEVER
    since_ms: int = 0           # start of the current state
    changes: deque[int] = field(default_factory=deque)  # change times, newest last
    queued: bool = False        # has an entry in the deadline heap
    reported_ms: int = 0        # last down report
    reports: int = 0
    flapping: bool = False


@dataclass(slots=True, frozen=True)
class Transition:
    station: str
    at_ms: int
    up: bool
    cause: str


@dataclass(slots=True, frozen=True)
class HealthEvent:
    """A notification for operators: `down` (report 1, then +1 per repeat), `up`, `flapping`."""

    event: str
    station: str
    zone: str
    cause: str
    at_ms: int
    since_ms: int
    report: int = 0

    def payload(self) -> bytes:
        return orjson.dumps({"v": 1, "event": self.event, "station": self.station,
                             "zone": self.zone, "cause": self.cause, "at_ms": self.at_ms,
                             "since_ms": self.since_ms, "report": self.report})


class StationView(NamedTuple):
    """What `/metrics` shows of one imported station (a tuple: built 10,000 times a scrape)."""

    station: str
    zone: str
    up: bool
    cause: str
    since_ms: int
    last_heard_ms: int   # its provisioning, when never heard
    last_read_ms: int    # likewise
    flapping: bool


class StationHealth:
    def __init__(self, policy: HealthPolicy, clock: Callable[[], int]) -> None:
        self.policy = policy
        self.clock = clock
        self._state: dict[str, StationState] = {}
        self._directory: dict[str, StationInfo] = {}
        self._timeout: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []
        self._down: set[str] = set()
        self._dirty: set[str] = set()
        self.pending: list[Transition] = []
        self.events: list[HealthEvent] = []
        self.targets = Targets.build(policy.stages, None)

    # -- the registry ----------------------------------------------------------

    def unknown(self, directory: Mapping[str, StationInfo]) -> set[str]:
        """The stations of `directory` whose state is not in memory yet."""
        return {sid for sid in directory if sid not in self._state}

    def load(self, directory: dict[str, StationInfo], stored: Mapping[str, StationState],
             ) -> None:
        """Take a new station directory, and the stored state of stations not yet in
        memory (after a restart, or a new import); provision stations imported since."""
        now = self.clock()
        self._directory = directory
        self._timeout = {sid: self.policy.timeout_ms(info) for sid, info in directory.items()}
        provisioned = [i.imported_ms for i in directory.values() if i.imported and i.imported_ms]
        self.targets = Targets.build(self.policy.stages, min(provisioned, default=None))
        for sid, info in directory.items():
            st = self._state.get(sid)
            if st is None:
                st = self._state[sid] = stored.get(sid) or StationState()
            if not info.imported:
                continue
            if st.up is None:  # imported since we last looked: down from its provisioning
                st.since_ms = 0
                self._change(sid, st, False, NEVER if st.last_heard_ms is None else OFFLINE,
                             info.imported_ms or now, provisioning=True)
                self._evaluate(sid, st, now)
            elif not st.up:
                self._down.add(sid)
                st.reported_ms = st.reported_ms or now
        for sid in [s for s in self._state if s not in directory]:  # removed from the registry
            del self._state[sid]
            self._down.discard(sid)
        # Timeouts may have changed: every up station gets its deadline anew.
        self._heap = []
        for sid, st in self._state.items():
            st.queued = False
            if st.up:
                self._queue(sid, st)

    # -- events, in the order the pipeline commits them ------------------------

    def heard(self, station: str, at_ms: int, *, read: bool = False) -> None:
        st = self._state.get(station)
        if st is None:
            return  # not in the registry (yet): nothing to judge
        if st.last_heard_ms is None or at_ms > st.last_heard_ms:
            st.last_heard_ms = at_ms
            self._dirty.add(station)
        if read and (st.last_read_ms is None or at_ms > st.last_read_ms):
            st.last_read_ms = at_ms
            self._dirty.add(station)
        if not st.up:
            self._evaluate(station, st, at_ms)

    def status(self, station: str, text: str, at_ms: int) -> None:
        st = self._state.get(station)
        if st is None:
            return
        if st.status_ms is None or at_ms >= st.status_ms:
            st.status, st.status_ms = text, at_ms
            self._dirty.add(station)
        if text == UP:
            self.heard(station, at_ms)
        else:
            self._evaluate(station, st, at_ms)

    def tick(self, now_ms: int | None = None) -> None:
        """Take down the stations whose deadline passed; report those still down."""
        now = self.clock() if now_ms is None else now_ms
        heap = self._heap
        while heap and heap[0][0] < now - GRACE_MS:
            _, sid = heapq.heappop(heap)
            st = self._state.get(sid)
            if st is None:
                continue
            st.queued = False
            if not st.up:
                continue
            deadline = self._deadline(sid, st)
            if deadline < now - GRACE_MS:
                self._change(sid, st, False, SILENT, deadline)
            else:
                self._queue(sid, st)  # heard since this entry was pushed
        for sid in self._down:
            st = self._state[sid]
            if now - st.reported_ms >= self.policy.repeat_ms:
                st.reported_ms = now
                st.reports += 1
                self.events.append(HealthEvent("down", sid, self._zone(sid), st.cause, now,
                                               st.since_ms, st.reports))

    # -- judging ---------------------------------------------------------------

    def _deadline(self, sid: str, st: StationState) -> int:
        return (st.last_heard_ms or 0) + self._timeout.get(sid, self.policy.default_timeout_ms)

    def _queue(self, sid: str, st: StationState) -> None:
        if not st.queued:
            heapq.heappush(self._heap, (self._deadline(sid, st), sid))
            st.queued = True

    def _judge(self, sid: str, st: StationState, at_ms: int) -> tuple[bool, str]:
        if st.status == UP and st.last_heard_ms is not None and at_ms <= self._deadline(sid, st):
            return True, UP
        if st.status == OFFLINE:
            return False, OFFLINE
        if st.last_heard_ms is None:
            return False, NEVER
        return False, OFFLINE if st.status is None else SILENT

    def _evaluate(self, sid: str, st: StationState, at_ms: int) -> None:
        if st.up is None:
            return
        up, cause = self._judge(sid, st, at_ms)
        if up != st.up:
            self._change(sid, st, up, cause, at_ms)
        elif not up:
            st.cause = cause  # still down, for another reason now: not a transition

    def _change(self, sid: str, st: StationState, up: bool, cause: str, at_ms: int, *,
                provisioning: bool = False) -> None:
        at = max(at_ms, st.since_ms)  # never back in time
        was_since = st.since_ms
        st.up, st.cause, st.since_ms = up, cause, at
        self.pending.append(Transition(sid, at, up, cause))
        zone = self._zone(sid)
        window_start = at - self.policy.flap_window_ms
        st.changes.append(at)
        while st.changes and st.changes[0] < window_start:
            st.changes.popleft()
        if up:
            self._down.discard(sid)
            st.reports = 0
            self._queue(sid, st)
            self.events.append(HealthEvent("up", sid, zone, UP, at, was_since))
        else:
            self._down.add(sid)
            st.reported_ms = self.clock()
            if not provisioning:  # an import of many stations is not news
                st.reports = 1
                self.events.append(HealthEvent("down", sid, zone, cause, at, at, 1))
        flapping = len(st.changes) > self.policy.flap_limit
        if flapping and not st.flapping:
            self.events.append(HealthEvent("flapping", sid, zone, cause, at, at))
        st.flapping = flapping

    def _zone(self, sid: str) -> str:
        info = self._directory.get(sid)
        return info.zone if info is not None else "unassigned"

    # -- for the store and the service -----------------------------------------

    def take_pending(self) -> tuple[list[Transition], list[dict[str, object]]]:
        """The transitions and the changed station rows to store; `put_back` if that fails."""
        transitions, self.pending = self.pending, []
        rows: list[dict[str, object]] = []
        for sid in sorted(self._dirty):
            st = self._state.get(sid)
            if st is not None:
                rows.append({"sid": sid, "st": st.status, "st_ms": st.status_ms,
                             "heard": st.last_heard_ms, "read": st.last_read_ms})
        self._dirty.clear()
        return transitions, rows

    def reconcile(self, stored: dict[str, tuple[bool, str]]) -> None:
        """Taking over storage from another worker: queue a transition for every station
        whose state differs from its newest stored one (`stored`: up, cause) and is not
        already pending, and every station's row, so that the database catches up."""
        last = {t.station: (t.up, t.cause) for t in self.pending}
        for sid, st in self._state.items():
            if st.up is None:
                continue
            now = (st.up, st.cause)
            if stored.get(sid) != now and last.get(sid, stored.get(sid)) != now:
                self.pending.append(Transition(sid, st.since_ms, st.up, st.cause))
        self._dirty.update(self._state)

    def put_back(self, transitions: list[Transition], rows: list[dict[str, object]]) -> None:
        self.pending[:0] = transitions
        self._dirty.update(str(r["sid"]) for r in rows)

    def take_events(self) -> list[HealthEvent]:
        events, self.events = self.events, []
        return events

    # -- reading ----------------------------------------------------

    def state(self, station: str) -> StationState | None:
        return self._state.get(station)

    @property
    def directory(self) -> dict[str, StationInfo]:
        return self._directory

    def views(self) -> Iterator[StationView]:
        window_start = self.clock() - self.policy.flap_window_ms
        limit = self.policy.flap_limit
        states = self._state
        for sid, info in list(self._directory.items()):
            st = states.get(sid)
            if st is None or not info.imported or st.up is None:
                continue
            provisioned = info.imported_ms or st.since_ms
            changes = st.changes
            # flapping: the (limit+1)-th newest change is still inside the window
            flapping = len(changes) > limit and changes[-limit - 1] >= window_start
            yield StationView(sid, info.zone, st.up, st.cause, st.since_ms,
                              st.last_heard_ms or provisioned, st.last_read_ms or provisioned,
                              flapping)

    def target(self) -> Target:
        return self.targets.at(self.clock())

    def online_ratio(self) -> float:
        views = list(self.views())
        return sum(v.up for v in views) / len(views) if views else 0.0
