"""The `minisae` command line: `commands` runs each subcommand, `parser` builds the flags, `args`
checks their values and ranges before any work starts.

    minisae train --arch jumprelu --target-l0 32 --activations acts/ --steps 20000 --out run/
    python -m minisae.cli compare --out report/      # the same as `minisae compare --out report/`
"""

from minisae.cli.commands import build_parser, main

__all__ = ["main", "build_parser"]
