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

# Table 3: operations accepted by op_on, controller and LNM alike.
OPERATIONS = ("pause", "resume", "shutdown", "reboot", "hibernate", "restore",
              "destroy", "cycle")

# The states an operation may be applied from; anything else is refused
# before any LNM is contacted.
OPERATION_PRECONDITIONS = {
    "pause": {RUN},
    "resume": {PAUSED},
    "shutdown": {RUN, PAUSED},
    "reboot": {RUN},
    "hibernate": {RUN, PAUSED},
    "restore": {HIBERNATED},
    "destroy": {RUN, PAUSED, HIBERNATED, SHUTOFF, MISSING, UNKNOWN},
    "cycle": {RUN, PAUSED, SHUTOFF},
}

# The state a successful operation leaves the VM in (destroy removes it).
OPERATION_RESULT = {
    "pause": PAUSED,
    "resume": RUN,
    "shutdown": SHUTOFF,
    "reboot": RUN,
    "hibernate": HIBERNATED,
    "restore": RUN,
    "destroy": None,
    "cycle": RUN,
}

# Operations that put a VM in a state (OPERATION_RESULT) rather than act
# on it (reboot, cycle): one on a VM in that state already has nothing to do
# and succeeds as "already" (idempotent, like the LNM's commands). ALREADY:
# operation -> the states in which it is done already.
SETS_STATE = ("pause", "resume", "shutdown", "hibernate", "restore", "destroy")
ALREADY = {operation: {OPERATION_RESULT[operation]} for operation in SETS_STATE
           if OPERATION_RESULT.get(operation)}
