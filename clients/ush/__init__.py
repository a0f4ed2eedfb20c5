"""ush, the Usher shell.

Interactive (``ush``): a command line for the Usher controller that looks
like the paper's Figure 3. One-shot (``ush [--config FILE] [--json] COMMAND
ARGS...``): connect, run one command, print its result (as JSON with
``--json``) and exit with 0 (success), 1 (the command failed, or failed for
some VMs), 2 (usage or configuration error) or 3 (cannot connect or log in),
in the manner of virsh.

The package, from the outside in:

- ``program``: the options and the entry point (``usher.clients.ush:main``);
- ``console``: the terminal of interactive mode (readline, getpass) and the
  reactor thread it talks to;
- ``shell``: runs command lines against an ``UsherClient``-like object on the
  reactor thread, numbers results as in Figure 3, and owns the session
  (client, callbacks, change notices);
- ``cli``: the command table, each parser carrying its handler;
  ``cmd_session``, ``cmd_vms``, ``cmd_lnms``, ``cmd_plugins``: the commands,
  each group declaring its parsers and handlers; ``parsing``: the parser
  class and the checks several commands share;
- ``outcome``: what a command comes to, and exit statuses;
- ``format``: records and results as text, and --json; ``monitor``: the
  monitoring cells; ``help_text``: the online help; ``settings``: [ush].
"""

from .cli import build_parsers
from .cmd_lnms import CLEAR_SCREEN
from .console import Console, PasswordPrompter
from .format import format_duration, format_lnm_list, format_vm_list, natural_key
from .outcome import (EXIT_CONNECTION, EXIT_FAILED, EXIT_NO_MATCH, EXIT_OK, EXIT_USAGE,
                      Cancelled, Outcome, UsageError)
from .program import banner, default_client_factory, main, run, version
from .settings import UshSettings, load_settings
from .shell import Shell

__all__ = ["build_parsers", "Console", "PasswordPrompter", "format_duration",
           "format_lnm_list", "format_vm_list", "natural_key", "CLEAR_SCREEN",
           "EXIT_CONNECTION", "EXIT_FAILED", "EXIT_NO_MATCH", "EXIT_OK", "EXIT_USAGE",
           "Cancelled", "Outcome",
           "UsageError", "banner", "default_client_factory", "main", "run", "version",
           "UshSettings", "load_settings", "Shell"]
