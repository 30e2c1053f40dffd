"""``python -m hcral`` (and ``torchrun -m hcral train ...``)."""

import sys

from hcral.cli import main

sys.exit(main())
