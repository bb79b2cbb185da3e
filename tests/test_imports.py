import subprocess
import sys


def test_import_has_no_heavy_side_effects():
    code = (
        "import sys, contrastive_sc\n"
        "heavy = [m for m in ('mlflow', 'onnxruntime', 'leidenalg', 'pyspark') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _imports_of_the_package():
    """``{module: {imported package modules}}`` for every module of contrastive_sc, read from its source."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "contrastive_sc"
    graph = {}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                imported |= {target} | {f"{target}.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("contrastive_sc"):
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[module] = imported
    return {m: {i for i in deps if i in graph and i != m} for m, deps in graph.items()}


def test_the_method_imports_nothing_from_the_benchmarks_or_above_it():
    graph = _imports_of_the_package()
    for module, imported in graph.items():
        if module.startswith("contrastive_sc.method"):
            above = {i for i in imported if i.startswith(("contrastive_sc.benchmarks", "contrastive_sc.mlops",
                                                          "contrastive_sc.serve", "contrastive_sc.cli"))}
            assert not above, f"{module} imports {sorted(above)}"
        if module.startswith("contrastive_sc.analysis"):
            above = {i for i in imported if not i.startswith("contrastive_sc.analysis")}
            assert not above, f"{module} imports {sorted(above)}"


def test_no_import_circle():
    graph = _imports_of_the_package()
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                raise AssertionError(" -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
