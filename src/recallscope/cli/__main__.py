"""``python -m recallscope.cli``."""

import sys

from recallscope.cli import main

sys.exit(main())
