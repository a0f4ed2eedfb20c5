import sys

from usher.clients.web import main

sys.exit(main())
