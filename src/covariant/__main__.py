"""``python -m covariant``: the same as the ``covariant`` command."""

import sys

from .cli.main import main

sys.exit(main())
