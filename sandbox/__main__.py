"""``python -m sandbox``: the same as the ``sandbox`` console script."""

import sys

from .cli import main

sys.exit(main())
