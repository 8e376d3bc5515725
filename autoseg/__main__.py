"""``python -m autoseg`` (also what ``torchrun -m autoseg`` starts)."""

import sys

from .cli import main

sys.exit(main())
