"""The library's layers: generic modules know sources only through the source interface."""

from __future__ import annotations

import ast
from pathlib import Path

from medsync.sources import known_protocols

MEDSYNC = Path(__file__).resolve().parents[1] / "plugins" / "medsync"


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from medsync.sources import rest`` imports a protocol package too.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_generic_modules_import_the_source_interface_only() -> None:
    # Issue 11: staging, merge, report, tasks, hooks, config (and every other module outside
    # sources/) import medsync.sources or medsync.sources.base, never a protocol's package.
    protocols = {f"medsync.sources.{name}" for name in known_protocols()}
    generic = [p for p in MEDSYNC.rglob("*.py") if "sources" not in p.relative_to(MEDSYNC).parts]
    assert {p.stem for p in generic} >= {"staging", "merge", "report", "tasks", "config", "mirror"}

    def is_protocol(module: str) -> bool:
        return any(module == p or module.startswith(f"{p}.") for p in protocols)

    offending = {str(p.relative_to(MEDSYNC)): sorted(filter(is_protocol, _imported_modules(p))) for p in generic}
    assert {where: modules for where, modules in offending.items() if modules} == {}
    # The check sees what it looks for: a protocol module imports its own package.
    assert any(m.startswith("medsync.sources.rest") for m in _imported_modules(MEDSYNC / "sources/rest/source.py"))
