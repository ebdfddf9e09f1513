"""`python -m control`: the same as the `pyflanneld` command."""

import sys

from control.cli import main

sys.exit(main())
