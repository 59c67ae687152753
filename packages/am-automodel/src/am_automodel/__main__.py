"""`python -m am_automodel train ...` is the `automodel` command."""

import sys

from am_automodel.cli import main

sys.exit(main())
