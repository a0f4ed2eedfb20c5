"""A batch job and the states it goes through.

    queued -> starting -> running -> done          (its VM shut off by itself)
                                  -> stopping -> timeout | cancelled
              starting -> queued                   (the start failed; tried again)
              starting -> failed                   (max_start_attempts reached)
    queued -> cancelled;  running -> failed         (its VM vanished)

A job that ended (done, timeout, cancelled, failed) never changes again.
"""

import dataclasses

from usher.errors import InvalidRequest

QUEUED = "queued"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
DONE = "done"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
FAILED = "failed"

ENDED = frozenset({DONE, TIMEOUT, CANCELLED, FAILED})
ACTIVE = frozenset({STARTING, RUNNING, STOPPING})

TRANSITIONS = {
    QUEUED: {STARTING, CANCELLED},
    STARTING: {RUNNING, QUEUED, FAILED, CANCELLED},
    RUNNING: {DONE, STOPPING, FAILED},
    STOPPING: {TIMEOUT, CANCELLED, DONE, FAILED},
}


class BadTransition(InvalidRequest):
    pass


@dataclasses.dataclass
class Job:
    id: str
    owner: str
    vcpus: int
    memory_mib: int
    walltime: float
    submitted: float
    seq: int = 0
    uid: int = -1                   # the submitter (the job file's owner)
    name: str | None = None
    args: dict = dataclasses.field(default_factory=dict)
    state: str = QUEUED
    lnm: str | None = None
    started: float | None = None
    ended: float | None = None
    attempts: int = 0
    stop_reason: str | None = None
    stop_sent: float | None = None
    error: str | None = None

    @property
    def vm_short(self):
        """The VM's short name: ``<job id>.<cluster>`` is formed by the daemon."""
        return self.id

    @property
    def expected_end(self):
        return None if self.started is None else self.started + self.walltime

    @property
    def ended_state(self):
        return self.state in ENDED

    def move(self, state, now, **changes):
        if state not in TRANSITIONS.get(self.state, ()):
            raise BadTransition(f"job {self.id}: {self.state} -> {state} is not allowed")
        self.state = state
        for key, value in changes.items():
            setattr(self, key, value)
        if state in ENDED:
            self.ended = now

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
