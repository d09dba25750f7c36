"""The shape of the code: no import cycle among the project's modules, and the one-home rules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxyattention", "launcher", "hydra_plugins")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module an import names (``a.b.c`` may be module ``a.b`` importing ``c``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports, anywhere in its body (deferred imports count too)."""
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for n in names:
                target = _resolve(n, known)
                if target and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_launcher_core_never_imports_the_app():
    """launcher/ is a Hydra launcher with a store; proxyattention/ is one app that uses it. The app plugs in
    through the entry point group ``launcher.apps`` (proxyattention.sweep.app.TrialApp), never by import."""
    graph = import_graph()
    offenders = {m: sorted(n for n in deps if n.startswith("proxyattention"))
                 for m, deps in graph.items() if m.startswith("launcher")}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_launcher_core_names_no_app_module():
    """Not even as a string (``python -m proxyattention.cell``, ``importlib.import_module("proxyattention…")``)."""
    named = []
    for mod, path in _modules().items():
        if mod.startswith("launcher"):
            code = [ln for ln in path.read_text().splitlines() if not ln.strip().startswith("#")]
            named += [f"{mod}: {ln.strip()}" for ln in code
                      if re.search(r"[\"']proxyattention[.\"']", ln)]
    assert not named


def test_the_app_registers_itself_in_one_place():
    from importlib.metadata import entry_points

    from launcher import apps

    table = (ROOT / "pyproject.toml").read_text().split(f'[project.entry-points."{apps.GROUP}"]\n', 1)[1]
    assert table.split("\n\n", 1)[0].strip() == 'proxyattention = "proxyattention.sweep.app:TrialApp"'
    assert {e.name: e.value for e in entry_points(group=apps.GROUP)} == {
        "proxyattention": "proxyattention.sweep.app:TrialApp"}  # installed as pyproject.toml says
    assert [a.name for a in apps.installed()] == ["proxyattention"]


def test_one_home_for_identity_and_atomic_writes():
    """Ids are hashed only by launcher.fileio.digest; temp-file renames only in fileio."""
    for mod, path in _modules().items():
        text = path.read_text()
        if mod != "launcher.fileio":
            assert "hashlib.sha256(blob" not in text, f"{mod} hashes configs itself"
        if mod != "launcher.fileio":
            assert "os.replace(" not in text, f"{mod} renames temp files itself; use launcher.fileio"


def test_no_private_name_crosses_a_module():
    """``from x import _name`` between project modules means the name is not private: make it public."""
    crossings = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                crossings += [f"{mod}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not crossings


def test_the_data_package_reads_its_sources_from_one_table():
    from proxyattention.config import DATASET_SOURCES
    from proxyattention.data.registry import SOURCES

    assert DATASET_SOURCES == tuple(SOURCES)
    rooted = {n for n, s in SOURCES.items() if s.needs_root}
    assert rooted == {"imagefolder", "cifar100", "caltech101", "places365"}


def test_a_slurm_job_unpickles_without_heavy_imports():
    """The node imports launcher.slurm_job to unpickle a job: no torch, numpy, omegaconf or submitit."""
    import subprocess
    import sys

    code = ("import sys, launcher.slurm_job; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'numpy', 'omegaconf', 'submitit')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
