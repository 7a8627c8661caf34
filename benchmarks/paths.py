"""Where medsync's code is imported from: ``plugins/`` (as in Airflow), or another checkout's.

``--plugins DIR`` runs the benchmark against another copy of ``plugins/`` (say, the previous
commit's, from ``git worktree``) for before/after figures. It must be settled before anything
imports medsync, hence this module and its early call in ``__main__``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_plugins(argv: list[str]) -> Path:
    """Puts the plugins folder (``--plugins DIR`` in ``argv``, else the repo's) first on sys.path."""
    plugins = ROOT / "plugins"
    for i, arg in enumerate(argv):
        if arg == "--plugins" and i + 1 < len(argv):
            plugins = Path(argv[i + 1]).resolve()
        elif arg.startswith("--plugins="):
            plugins = Path(arg.split("=", 1)[1]).resolve()
    if not (plugins / "medsync").is_dir():
        raise SystemExit(f"{plugins} has no medsync package")
    for entry in (str(ROOT), str(plugins)):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    # Python 3.11's fork server ignores its parent's sys.path, so it finds the code through
    # PYTHONPATH; without it the preload fails silently and every task imports Airflow anew.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(plugins), str(ROOT), *inherited])
    return plugins
