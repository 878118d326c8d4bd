"""`python -m pytest_supermachine` is the `supermachine` command."""

from .cli import main

raise SystemExit(main())
