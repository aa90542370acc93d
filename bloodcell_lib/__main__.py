"""Entry point for `python -m bloodcell_lib`."""

import sys

from bloodcell_lib.cli import main

sys.exit(main())
