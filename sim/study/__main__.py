"""``python -m sim.study [options]``: the same as ``peel-fed study [options]``."""

import sys

from sim.cli import main

sys.exit(main(["study", *sys.argv[1:]]))
