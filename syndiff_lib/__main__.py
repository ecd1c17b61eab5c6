"""`python -m syndiff_lib` is the `syndiff` command."""

import sys

from .cli import main

sys.exit(main())
