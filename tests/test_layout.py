"""The layout shows the architecture and cannot rot: every import in `service/` and `training/`
(module-level or inside a function) is read from the source with `ast`, and the rooms may only
depend on each other in one direction, with no import cycle anywhere.

    telemetry  <-  recognition  <-  api  <-  server  <-  commands/cli
                                                        perf (over the wire; only the CLI imports it)
    training   ->  service.idx and the protocol-free parts of recognition (contract, recipe, loader)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT

PACKAGES = ("service", "training")
MAX_MODULES_PER_PACKAGE = 10

# room -> the rooms it may import (its own room is always allowed).
ALLOWED: dict[str, set[str]] = {
    "service": set(),  # service/__init__.py: the version only
    "service.telemetry": {"service"},
    "service.recognition": {"service.telemetry"},
    "service.api": {"service.recognition", "service.telemetry", "service.gen"},
    "service.server": {"service.api", "service.recognition", "service.telemetry", "service.gen", "service"},
    "service.idx": set(),
    "service.client": {"service.gen"},
    "service.client_flags": {"service.client"},
    # The load generator talks to a server over the wire: stubs, client and IDX reader. The benchmark's
    # in-process ceiling loads the model with the server's own loader (checked module by module below).
    "service.perf": {"service.gen", "service.client", "service.client_flags", "service.idx",
                     "service.recognition"},
    "service.commands": {"service.client", "service.client_flags", "service.server", "service.telemetry",
                         "service.perf", "service"},
    "service.cli": {"service", "service.commands"},
    "service.gen": set(),
    # Training shares with serving only the contract (model_metadata), the MNIST recipe (preprocess:
    # what it trains on is exactly what the server feeds the model), the loader (a quantized model is
    # refused unless it loads as `digits serve` loads it), the IDX reader, and the rejection rule with its
    # strokes test (thresholds are chosen and measured with the server's own decide).
    "training": {"service.idx", "service.recognition"},
}
TRAINING_MAY_IMPORT = {"service.idx", "service.recognition.model_metadata", "service.recognition.preprocess",
                       "service.recognition.rejection", "service.recognition.strokes",
                       "service.recognition.model"}
# The benchmark's in-process ceiling loads the model with the server's loader and recipe; the number
# reader's measurement (service.perf.reading.numbers) runs the protocol-free Reader in-process the same way.
PERF_MAY_IMPORT_FROM_RECOGNITION = {"service.recognition.model", "service.recognition.preprocess",
                                    "service.recognition.decode", "service.recognition.reading.reader",
                                    "service.recognition.reading.segment", "service.recognition.reading.scoring"}


def modules() -> dict[str, Path]:
    """Every first-party module (generated stubs excluded), by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            name = ".".join(parts)
            if not name.startswith("service.gen"):
                found[name] = path
    return found


def imports(path: Path, known: set[str]) -> Iterator[str]:
    """First-party modules that `path` imports, resolved to the deepest module that exists."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from service.api import http` imports a module; `from service import __version__` the package.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        for name in names:
            if not name.startswith(PACKAGES):
                continue
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name.startswith("service.gen"):
                yield "service.gen"
            elif name in known:
                yield name


def room(module: str) -> str:
    """The room of a module: its top-level subpackage of `service`, or `training`."""
    parts = module.split(".")
    if parts[0] == "training":
        return "training"
    return ".".join(parts[:2])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found) | {"service.gen"}
    return {name: {m for m in imports(path, known) if m != name} for name, path in found.items()}


def test_every_room_imports_only_the_rooms_below_it(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, deps in sorted(graph.items()):
        own = room(module)
        for dep in sorted(deps):
            target = room(dep) if dep != "service" else "service"
            if target != own and target not in ALLOWED[own]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_training_uses_only_the_contract_the_recipe_the_loader_and_the_idx_reader(
        graph: dict[str, set[str]]) -> None:
    used = {dep for module, deps in graph.items() if room(module) == "training" for dep in deps
            if dep.startswith("service")}
    assert used <= TRAINING_MAY_IMPORT, sorted(used - TRAINING_MAY_IMPORT)


def test_perf_reaches_the_core_only_for_the_in_process_ceiling(graph: dict[str, set[str]]) -> None:
    used = {dep for module, deps in graph.items() if room(module) == "service.perf" for dep in deps
            if dep.startswith("service.recognition")}
    assert used <= PERF_MAY_IMPORT_FROM_RECOGNITION, sorted(used - PERF_MAY_IMPORT_FROM_RECOGNITION)
    generator = {"service.perf.loadtest", "service.perf.loadsource", "service.perf.loadstats"}
    reaching = {m: sorted(d for d in graph[m] if d.startswith("service.recognition")) for m in generator}
    assert not any(reaching.values()), f"the load generator imports the server's internals: {reaching}"


def test_nothing_but_the_cli_imports_perf(graph: dict[str, set[str]]) -> None:
    importers = {module for module, deps in graph.items() if room(module) != "service.perf"
                 for dep in deps if room(dep) == "service.perf"}
    assert importers == {"service.commands"}


def test_service_never_imports_training_or_torch() -> None:
    for name, path in modules().items():
        if not name.startswith("service"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & {"training", "torch"}, f"{name} imports {roots & {'training', 'torch'}}"


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    # A package's __init__ is not an edge source here unless it imports something itself.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_package_holds_more_than_about_ten_modules() -> None:
    for package in [ROOT / p for p in PACKAGES] + [d for p in PACKAGES for d in (ROOT / p).rglob("*")
                                                   if d.is_dir() and (d / "__init__.py").is_file()]:
        if "gen" in package.relative_to(ROOT).parts:
            continue
        count = len([f for f in package.glob("*.py") if f.name != "__init__.py"])
        assert count <= MAX_MODULES_PER_PACKAGE, f"{package.relative_to(ROOT)} holds {count} modules"


def test_the_readme_module_map_names_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Architecture"):readme.index("## The API")]
    named = {word.strip("`") for word in section.split() if word.strip("`,.;:()").endswith(".py")}
    named = {w.strip("`,.;:()") for w in named}
    assert named, "the README's architecture section names no module"
    missing = sorted(n for n in named if n.startswith(PACKAGES) and not (ROOT / n).is_file())
    assert not missing, f"the README names files that do not exist: {missing}"
    every = {str(p.relative_to(ROOT)) for p in modules().values() if p.name != "__init__.py"}
    unnamed = sorted(p for p in every if p.startswith("service/") and p not in named)
    assert not unnamed, f"the README's module map leaves out: {unnamed}"
