import os
import signal

import pytest_twisted
from twisted.internet import threads


def _mask():
    return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, set()))


@pytest_twisted.ensureDeferred
async def test_probe_signal_masks():
    blocked = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        blocked[tid] = (fields["Name"].strip(), fields["SigBlk"].strip())
    pool = await threads.deferToThread(_mask)
    with open("/tmp/usher-signal-probe.txt", "w") as f:
        print("PROBE main", _mask(), "pool", pool, "SIGINT", signal.getsignal(signal.SIGINT),
              "threads", blocked, file=f)
