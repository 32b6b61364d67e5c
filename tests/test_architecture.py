"""The structure drawn from the code's own imports: layers only import downwards, model families stay in their
folders, nothing below the command line imports it, no import circles, and no package needs ComfyUI."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ["cli", "nodes", "video", "models"]
# Which top-level parts each part may import (besides itself). models/shared is the bottom; "root" is what the
# package's own __init__ defines (its version), for the entry points to print.
ALLOWED = {
    "nodes": {"video", "models", "shared", "root"},
    "cli": {"video", "models", "shared", "root"},
    "video": {"models", "shared"},
    "models": {"shared"},
    "shared": set(),
}
# Model families may use each other only where one is a component of the other.
FAMILY_DEPENDENCIES = {"stream_diffvsr": {"raft"}}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in PACKAGES:
            yield rel


def _name(rel: pathlib.Path) -> list[str]:
    parts = list(rel.with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _root_names() -> set[str]:
    """The names the package's root __init__ assigns (its version, ...): not modules."""
    init = ROOT / "__init__.py"
    tree = ast.parse(init.read_text()) if init.exists() else ast.Module(body=[], type_ignores=[])
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def _part(parts: list[str]) -> str:
    if parts[:2] == ["models", "shared"]:
        return "shared"
    if len(parts) == 1 and parts[0] in _root_names():
        return "root"
    return parts[0]


def _family(parts: list[str]) -> str | None:
    if parts[0] == "models" and len(parts) > 1 and parts[1] not in ("shared",) and (ROOT / "models" / parts[1]).is_dir():
        return parts[1]
    return None


def _imports(rel: pathlib.Path, top_level_only: bool):
    """Package-internal imports of a module, as absolute dotted parts (relative imports resolved)."""
    tree = ast.parse((ROOT / rel).read_text(), str(rel))
    package = _name(rel) if rel.name == "__init__.py" else _name(rel)[:-1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            if node.module is None:
                for alias in node.names:
                    yield target + [alias.name]
            else:
                yield target
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in names:
                if name and name.split(".")[0] == "streamvsr":
                    yield name.split(".")[1:]


def test_layers_only_import_downwards_and_families_stay_apart():
    problems = []
    for rel in _modules():
        me = _name(rel)
        for target in _imports(rel, top_level_only=False):
            if not target:
                continue
            mine, theirs = _part(me), _part(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                problems.append(f"{rel} imports {'.'.join(target)} ({mine} -> {theirs})")
            fam, other = _family(me), _family(target)
            if fam and other and fam != other and other not in FAMILY_DEPENDENCIES.get(fam, set()):
                problems.append(f"{rel} (family {fam}) imports family {other}")
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    graph = {}
    for rel in _modules():
        me = ".".join(_name(rel))
        deps = set()
        for target in _imports(rel, top_level_only=True):
            # an import of a package runs its __init__; "from .x import y" may name a module or an attribute
            for n in range(len(target), 0, -1):
                cand = ".".join(target[:n])
                if (ROOT.joinpath(*target[:n]).with_suffix(".py").exists()
                        or (ROOT.joinpath(*target[:n]) / "__init__.py").exists()):
                    deps.add(cand)
                    break
        deps.discard(me)
        graph[me] = deps
    # a package's __init__ importing its own submodules is how packages work, not a circle
    for me, deps in graph.items():
        graph[me] = {d for d in deps if not (me and d.startswith(me + "."))}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_rule_catches_a_model_importing_the_command_line(tmp_path, monkeypatch):
    # on a copy of the sources, so that a killed run leaves no probe behind in the tree
    import shutil

    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "models" / "shared" / "_architecture_probe.py").write_text("from ...cli import main\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="shared -> cli"):
        test_layers_only_import_downwards_and_families_stay_apart()


@pytest.mark.parametrize("package", ["models", "models.shared", "models.raft", "models.stream_diffvsr",
                                     "models.flashvsr", "models.registry", "video", "cli"])
def test_each_package_imports_alone_without_comfyui_or_upper_layers(package):
    where = ROOT.joinpath(*package.split("."))
    assert where.exists() or where.with_suffix(".py").exists(), f"{package} is gone: update this list"
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("streamvsr", {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
mod = importlib.util.module_from_spec(spec); sys.modules["streamvsr"] = mod; spec.loader.exec_module(mod)
importlib.import_module("streamvsr.{package}")
loaded = sorted(m for m in sys.modules if m.startswith(("streamvsr.", "comfy", "folder_paths")))
print("\\n".join(loaded))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = out.stdout.split()
    assert not [m for m in loaded if m.startswith(("comfy", "folder_paths"))], loaded
    assert "streamvsr.nodes" not in loaded
    top = package.split(".")[0]
    if top != "cli":
        assert "streamvsr.cli" not in loaded, loaded
    if top == "models":
        assert "streamvsr.video" not in loaded, loaded
