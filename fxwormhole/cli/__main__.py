"""``python -m fxwormhole.cli``."""
import sys

from . import main

sys.exit(main())
