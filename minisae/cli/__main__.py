"""`python -m minisae.cli ...` runs the `minisae` command (as mpiexec launches it: docs/scale.md)."""

import sys

from minisae.cli.commands import main

sys.exit(main())
