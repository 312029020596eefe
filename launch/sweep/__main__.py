"""python -m launch.sweep: see cli.py."""

import sys

from launch.sweep.cli import main

sys.exit(main(sys.argv[1:]))
