"""``python -m linearize.cli``."""

from linearize.cli import main

main()
