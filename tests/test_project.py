"""The project's shape (docs/ARCHITECTURE.md) holds: utils/ is task-agnostic, nothing imports an entry
script, no code edits sys.path, tests do not import bench/ or conftest, and an unsupported Python
stops with one clear line."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = {"train_retrieval", "pretrain", "zero_shot", "finetune_imagecode", "eval_mmvp", "train_caption", "train_vqa",
                 "pretrain_blip", "train_nlvr", "eval_nocaps", "eval_retrieval_video"}
PACKAGES = ("utils", "models", "data", "tasks", "tools", "analysis", "bench")


def _imports(path: Path) -> set:
    """Top-level module names a file imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
            names |= {"conftest"} & set(node.module.split("."))  # `from tests.conftest import ...`
    return names


def _edits_sys_path(path: Path) -> bool:
    """Whether the file calls ``sys.path.insert`` / ``sys.path.append``."""
    for node in ast.walk(ast.parse(path.read_text())):
        f = getattr(node, "func", None)
        if (isinstance(node, ast.Call) and isinstance(f, ast.Attribute) and f.attr in ("insert", "append")
                and isinstance(f.value, ast.Attribute) and f.value.attr == "path"
                and isinstance(f.value.value, ast.Name) and f.value.value.id == "sys"):
            return True
    return False


def _files(*folders: str):
    return [p for f in folders for p in sorted((REPO / f).rglob("*.py"))]


def test_utils_is_task_agnostic():
    for path in _files("utils"):
        bad = _imports(path) & {"tasks", "models", "data", "tools", "analysis"} | (_imports(path) & ENTRY_SCRIPTS)
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_no_module_imports_an_entry_script():
    for path in _files(*PACKAGES, "tests") + [REPO / f"{name}.py" for name in ENTRY_SCRIPTS]:
        if path.parent.name == "tests" and path.name.startswith("test_"):
            continue  # tests drive the entry points as users do
        bad = _imports(path) & ENTRY_SCRIPTS
        assert not bad, f"{path.relative_to(REPO)} imports the entry script(s) {sorted(bad)}"


def test_no_sys_path_edits_and_tests_import_neither_bench_nor_conftest():
    for path in _files(*PACKAGES, "tests") + [REPO / f"{name}.py" for name in ENTRY_SCRIPTS]:
        assert not _edits_sys_path(path), f"{path.relative_to(REPO)} edits sys.path"
    for path in _files("tests"):
        bad = _imports(path) & {"bench", "conftest", "test_blip_fixture"}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("script", sorted(ENTRY_SCRIPTS))
def test_entry_scripts_parse_on_old_pythons_and_check_the_version_first(script):
    """The version check can only speak if the entry script itself parses on an old Python, and if
    `utils` (which holds the check) is its first project import."""
    source = (REPO / f"{script}.py").read_text()
    ast.parse(source, feature_version=(3, 7))
    ast.parse((REPO / "utils" / "__init__.py").read_text(), feature_version=(3, 4))
    first = next(n for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom))
                 and not (isinstance(n, ast.ImportFrom) and n.module == "__future__"))
    assert isinstance(first, ast.Import) and first.names[0].name == "utils", ast.dump(first)


def test_an_unsupported_python_stops_with_one_line():
    code = ("import sys\nsys.version_info = (3, 8, 10, 'final', 0)\nsys.version = '3.8.10 (test)'\n"
            "import runpy\nrunpy.run_path('train_retrieval.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "this project needs Python 3.10 or newer (3.10-3.12 are supported); this is Python 3.8.10. "
        "Create the environment with a newer python3 (see README.md)"]


# ----------------------------------------------------------------------------- modules of one concern

MAX_LINES = 500


def _project_modules() -> dict:
    """``{dotted name: path}`` of every Python module of the project (packages, entry scripts,
    tests and their helpers)."""
    paths = _files(*PACKAGES, "tests") + sorted(REPO.glob("*.py"))
    mods = {}
    for path in paths:
        if "fixtures" in path.relative_to(REPO).parts:
            continue
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def test_every_module_is_at_most_500_lines():
    """A module holds one concern (docs/ARCHITECTURE.md); past 500 lines it holds several."""
    long = {str(p.relative_to(REPO)): n for p in _project_modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def _import_graph(mods: dict) -> dict:
    """Module -> the project modules it imports, at its top or inside functions alike."""
    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                deps |= {resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else resolve(base)
                         for a in node.names}
        graph[name] = deps - {None, name}
    return graph


def _cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_two_modules_import_each_other_even_in_a_circle():
    """The house has floors (docs/ARCHITECTURE.md): no import, at a module's top or inside a function,
    closes a circle between project modules."""
    mods = {n: p for n, p in _project_modules().items() if not n.startswith("tests")}
    graph = _import_graph(mods)
    assert "tasks.retrieval" in graph["train_retrieval"] and "utils.errors" in graph["models.factory"]  # read
    assert not _cycles(graph), f"import circles: {_cycles(graph)}"
