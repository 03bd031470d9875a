"""`python -m s2d` runs the command-line tool."""
from s2d.cli import main

raise SystemExit(main())
