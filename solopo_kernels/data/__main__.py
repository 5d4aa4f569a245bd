"""``python -m solopo_kernels.data`` runs the ``solopo-data`` command line."""

import sys

from .cli import main

sys.exit(main())
