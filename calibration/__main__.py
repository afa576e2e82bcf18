"""``python -m calibration``: the same command as ``python -m calibration.fit``."""
import sys

from calibration.fit import main

sys.exit(main())
