"""`python -m control`: the same as the `pyflanneld` command."""

import sys

from control.service.cli import main

sys.exit(main())
