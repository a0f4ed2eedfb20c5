"""usherbatchd: the RRC-KI batch policy daemon, an Usher client (README,
"The batch policy daemon").

Jobs come from a spool directory (``usher-batch submit``); each runs in its
own VM (``<job>.batch`` of the daemon's account) with the vCPUs and memory
it asked for guaranteed; the VMs are packed onto as few hosts as the
guarantees allow, moved together as jobs end, and hosts left empty are put
in maintenance and powered down through the site's hook (and powered up
when the queue needs them). ``usher-batch report`` compares utilisation and
hosts in use with one job per host.

Layout, one job each: ``settings`` (BatchSettings, the [batchd] spec),
``spool`` (the queue and state files), ``jobs`` (Job and its states),
``policy`` (packing, backfill, consolidation, power: plain functions),
``accounting`` (utilisation, the one-job-per-host baseline), ``link`` (the
controller through UsherClient), ``hooks`` (power commands off the
reactor), ``scheduler`` (the loop), ``main`` (the daemon), ``cli`` and
``cmd_*`` (the usher-batch command).
"""

from .main import main, make_service
from .settings import BATCHD, BatchSettings

__all__ = ["BATCHD", "BatchSettings", "main", "make_service"]
