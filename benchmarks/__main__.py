"""``python -m benchmarks [--instances N] [--scale N,...] [--quick] ...``: see ``benchmarks.run``."""

from __future__ import annotations

import sys

from benchmarks.paths import use_plugins

use_plugins(sys.argv[1:])  # before anything imports medsync

from benchmarks.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
