"""`python -m s2d` runs the command-line tool."""
from s2d.pipeline.cli import main

raise SystemExit(main())
