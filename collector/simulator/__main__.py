"""``python -m collector.simulator [options]``: the same as ``zencoder-collector simulate``."""

from collector.simulator.cli import main

raise SystemExit(main())
