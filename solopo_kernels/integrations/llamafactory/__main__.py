"""``python -m solopo_kernels.integrations.llamafactory train config.yaml [key=value ...]``."""

import sys

from .launcher import main

if __name__ == "__main__":
    sys.exit(main())
