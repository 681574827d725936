"""The shape of the code: no private name crosses modules, no import cycle, the core names no adapter,
one engine (no branch per execution mode), PrototypeBuilder built in two modules at most."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lpcam_core": ROOT / "lpcam_core", "lpcam_adapters": ROOT / "adapters"}


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the two packages."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) of every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def test_no_private_name_crosses_modules():
    mods = modules()
    found = []
    for name, path in mods.items():
        for module, names, line in imports(name, path):
            if not module.startswith(tuple(PACKAGES)):
                continue
            for taken in names:
                target = f"{module}.{taken}"
                private = taken.startswith("_") and not taken.endswith("__")
                if private and target not in mods:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {taken} from {module}")
                elif target in mods and private:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports the private module {target}")
            if module.split(".")[-1].startswith("_") and module in mods:
                found.append(f"{path.relative_to(ROOT)}:{line} imports the private module {module}")
        # attribute access on an imported project module: `irn_family._scales(...)`
        aliases = {taken for module, names, _ in imports(name, path) for taken in names
                   if f"{module}.{taken}" in mods}
        text = path.read_text()
        for alias in aliases:
            for match in re.finditer(rf"\b{re.escape(alias)}\._[a-z]\w*", text):
                if not match.group(0).endswith("__"):
                    found.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert not found, "\n".join(found)


def test_no_import_cycles():
    mods = modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for module, names, _ in imports(name, path):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in mods and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    # a package's __init__ importing its own submodules is not a cycle of concern
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t.startswith(name + ".") and mods[name].name == "__init__.py")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_core_names_no_adapter():
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGES["lpcam_core"].rglob("*.py")
                 if "lpcam_adapters" in p.read_text()]
    assert not offenders, offenders


def test_one_engine():
    text = {p: p.read_text() for folder in PACKAGES.values() for p in folder.rglob("*.py")}
    assert not [p for p, t in text.items() if "ctx is None" in t]
    builders = sorted(str(p.relative_to(ROOT)) for p, t in text.items() if "PrototypeBuilder(" in t)
    assert len(builders) <= 2, builders


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_top_level_private_modules(package):
    assert not [p.name for p in PACKAGES[package].glob("_*.py") if p.name not in ("__init__.py", "_version.py")]
