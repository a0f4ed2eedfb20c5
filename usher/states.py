"""VM states as Usher names them, and the operations of the paper's Table 3.

The states are the user-visible vocabulary (``ush list``, ``--json``, events);
each VMM backend maps its own states onto these.
"""

RUN = "run"
PAUSED = "paused"
HIBERNATED = "hibernated"
SHUTOFF = "shutoff"
# Transitional states the controller sets while a command is in flight.
STARTING = "starting"
MIGRATING = "migrating"
# Set only by the controller: the LNM (or its VMM) stopped answering.
LOST = "lost"
# Reported by an LNM: the VM vanished from the host where it was last seen.
MISSING = "missing"
# An LNM lost its hypervisor connection and cannot tell the VM's state.
UNKNOWN = "unknown"

ALL_STATES = (RUN, PAUSED, HIBERNATED, SHUTOFF, STARTING, MIGRATING, LOST,
              MISSING, UNKNOWN)

# Table 3: operations accepted by op_on, controller and LNM alike. ``destroy``
# is Table 3's "hard shutdown a VM": the VM is powered off and kept (started
# again with start); ``delete`` (issue 17) removes a VM that is off, its
# definition and saved image with it.
OPERATIONS = ("pause", "resume", "shutdown", "reboot", "hibernate", "restore",
              "destroy", "cycle", "delete")

# Operations that lose a guest's running state or the VM itself: the
# interactive shell asks before applying them to more than one VM.
DESTRUCTIVE_OPERATIONS = ("destroy", "cycle", "delete")

# The states an operation may be applied from; anything else is refused
# before any LNM is contacted.
OPERATION_PRECONDITIONS = {
    "pause": {RUN},
    "resume": {PAUSED},
    "shutdown": {RUN, PAUSED},
    "reboot": {RUN},
    "hibernate": {RUN, PAUSED},
    "restore": {HIBERNATED},
    "destroy": {RUN, PAUSED, SHUTOFF},
    "cycle": {RUN, PAUSED, SHUTOFF},
    # A VM that is off, or gone from its host (only its record is left).
    "delete": {SHUTOFF, HIBERNATED, MISSING},
}

# What a forced delete (args {"force": True}) may also remove: it powers the
# VM off first, as destroy does.
DELETE_FORCED_FROM = {RUN, PAUSED, UNKNOWN}

# The state a successful operation leaves the VM in (delete removes it).
OPERATION_RESULT = {
    "pause": PAUSED,
    "resume": RUN,
    "shutdown": SHUTOFF,
    "reboot": RUN,
    "hibernate": HIBERNATED,
    "restore": RUN,
    "destroy": SHUTOFF,
    "cycle": RUN,
    "delete": None,
}

# Operations that put a VM in a state (OPERATION_RESULT) rather than act
# on it (reboot, cycle): one on a VM in that state already has nothing to do
# and succeeds as "already" (idempotent, like the LNM's commands). ALREADY:
# operation -> the states in which it is done already.
SETS_STATE = ("pause", "resume", "shutdown", "hibernate", "restore", "destroy")
ALREADY = {operation: {OPERATION_RESULT[operation]} for operation in SETS_STATE
           if OPERATION_RESULT.get(operation)}
