"""``python -m usher.clients.ush``: the ush program."""

from .program import main

main()
