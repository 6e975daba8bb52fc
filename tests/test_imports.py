"""diffattn imports with neither MLX nor PyTorch; asking for a missing backend is one line."""
import subprocess
import sys

BLOCK = "import sys; sys.modules['torch'] = None; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None; "


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True)


def test_import_without_frameworks():
    r = run("import diffattn, diffattn.spec, diffattn.params, diffattn.backend, diffattn.conformance; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_missing_backend_names_the_extra():
    for name, extra in (("mlx", "diffattn[mlx]"), ("cuda", "diffattn[cuda]")):
        r = run(f"from diffattn.backend import load; load({name!r})")
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert "BackendError" in last and extra in last


def test_conformance_reports_missing_backend_in_one_line():
    r = run("from diffattn.conformance import main; raise SystemExit(main(['tests/fixtures/reference_diffattn.safetensors', '--backend', 'mlx']))")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "pip install 'diffattn[mlx]'" in r.stderr


def _imports(root):
    """{module: modules of this repository it imports}, from the source (ast), import names being
    folder paths from the root; relative imports resolved against the importing package."""
    import ast

    mods = {}
    for top in ("diffattn", "backends", "benchmarks"):
        for path in (root / top).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = (path, parts[-1] == "__init__")
    graph = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                # `from P import m` imports the module P.m where there is one, else names of P
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in mods else stem for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in mods and t != name}
        graph[name] = found
    return graph


def test_the_import_graph_has_no_cycle_and_reaches_the_backends():
    """Folders are import names (docs/design.md, "Packaging"): the graph read from the source
    includes backends/ and has no cycle (imports under `if TYPE_CHECKING:` count too, except
    params' annotation-only one, which ast sees; it is excluded by name below)."""
    from pathlib import Path

    graph = _imports(Path(__file__).resolve().parent.parent)
    assert "backends.cuda.ops.paired.launch" in graph and "backends.mlx.model" in graph
    graph["diffattn.params"].discard("diffattn.config")  # ModelConfig under TYPE_CHECKING, for annotations
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_every_python_file_over_450_lines_states_why_in_the_design_doc():
    """docs/design.md's "Files over 450 lines" table names every such file (the rule issue 24 set)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    table = (root / "docs" / "design.md").read_text().split("## Files over 450 lines", 1)[1].split("\n## ", 1)[0]
    long = [str(p.relative_to(root)) for top in ("diffattn", "backends", "benchmarks", "tests")
            for p in (root / top).rglob("*.py") if len(p.read_text().splitlines()) > 450]
    assert [f for f in long if f"`{f}`" not in table] == []
