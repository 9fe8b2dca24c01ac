"""`python -m lens_core ...`: see `lens_core.cli`."""

import sys

from .cli import main

sys.exit(main())
