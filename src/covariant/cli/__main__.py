"""``python -m covariant.cli``: the same as the ``covariant`` command."""

import sys

from .main import main

sys.exit(main())
