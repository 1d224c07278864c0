"""Imports run one way: commands -> subsystems -> shared inspector modules -> flowtap.proxy."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSPECTOR = REPO / "inspector"
SUBSYSTEMS = ("pcapfile", "tui", "replay")
SHARED = ("summary", "flow_filter", "filtered_observer", "log", "stop_request")
# A subsystem may use the ones named here, and no other (nor any command).
SUBSYSTEM_MAY_USE = {"pcapfile": set(), "tui": {"pcapfile"}, "replay": {"pcapfile"}}


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _imports(path: Path, root: Path, package: str) -> set[str]:
    """The flowtap modules `path` imports (resolved to absolute names)."""
    name = _module_name(path, root, package)
    here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {module for module in found if module.startswith("flowtap.")}


def _inspector_part(module: str) -> str | None:
    """The subsystem, shared module or command `module` belongs to (None outside inspector)."""
    parts = module.split(".")
    if parts[:2] != ["flowtap", "inspector"] or len(parts) < 3:
        return None
    return parts[2]


def test_proxy_never_imports_the_inspector() -> None:
    for path in (REPO / "proxy").rglob("*.py"):
        bad = {m for m in _imports(path, REPO / "proxy", "flowtap.proxy") if "inspector" in m}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_shared_modules_import_only_each_other_and_the_proxy() -> None:
    for name in SHARED:
        path = INSPECTOR / f"{name}.py"
        parts = {_inspector_part(m) for m in _imports(path, INSPECTOR, "flowtap.inspector")}
        assert parts <= {None, *SHARED}, f"{name} imports {sorted(p for p in parts if p)}"


def test_subsystems_import_no_command_and_each_other_one_way() -> None:
    modules = {p.stem for p in INSPECTOR.glob("*.py")} | set(SUBSYSTEMS)
    commands = modules - set(SUBSYSTEMS) - set(SHARED) - {"__init__"}
    assert {"cli", "show", "demo"} <= commands
    for subsystem in SUBSYSTEMS:
        for path in (INSPECTOR / subsystem).rglob("*.py"):
            parts = {_inspector_part(m) for m in _imports(path, INSPECTOR, "flowtap.inspector")}
            parts -= {None, subsystem, *SHARED}
            allowed = SUBSYSTEM_MAY_USE[subsystem]
            assert parts <= allowed, f"{path.relative_to(REPO)} imports {sorted(parts - allowed)}"
