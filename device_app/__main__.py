"""``python -m device_app`` is ``hosvd-device``."""

import sys

from device_app.cli import main

if __name__ == "__main__":
    sys.exit(main())
