"""``python -m usher.clients.plusher``: run plusher."""

import sys

from usher.clients.plusher.main import main

sys.exit(main())
