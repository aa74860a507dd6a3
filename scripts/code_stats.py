"""Shape of the package, measured on the tree: lines per module, the largest functions, engine-kind checks
outside engines/, import cycles (module-level and function-level imports alike), private names imported from
another module, where the engine set-up sequence is written, and whether the lint covers scripts/.

    python scripts/code_stats.py [--json] [--root OTHER_CHECKOUT/src/flashback]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "flashback"
# What telling engines apart looks like: comparing an engine-kind string, or testing for a concrete engine class.
ENGINE_KIND = re.compile(
    r"\.engine\s*[!=]=|[!=]=\s*\"(torch|llamacpp|llama\.cpp|upstream|export)\"|"
    r"isinstance\([^)]*(Engine|LoadedModel|Model)\b|getattr\([^)]*\"client\""
)


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """flashback modules this module imports anywhere (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flashback"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flashback"))
    return found


LIMIT = 60  # lines a function may have
# The engine set-up sequence: one function (engines.load.setup) calls these; a command calling them is a copy of it.
# (layout_settings alone is also the per-request rule of a mode's markers and tail, so it is not one of them.)
SETUP_STEPS = ("plan_adapters", "tuned_layouts", "load_engine")


def private_imports(path: Path) -> list[str]:
    """`from flashback.x import _name`: a module reaching into another's internals."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flashback"):
            out += [
                f"{node.lineno}: {node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.endswith("__")
            ]
    return out


def setup_callers(modules: dict[str, Path]) -> list[str]:
    """Functions that call a step of the set-up sequence, outside the module that defines them."""
    out = set()
    for name, p in modules.items():
        if name in ("flashback.engines.load", "flashback.engines.torch.adapters"):  # the steps' own homes
            continue
        for fn in ast.walk(ast.parse(p.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                called = node.func if isinstance(node, ast.Call) else None
                label = getattr(called, "id", None) or getattr(called, "attr", None)
                if label in SETUP_STEPS:
                    out.add(f"{name}.{fn.name} calls {label}")
    return sorted(out)


def lint_covers_scripts(root: Path) -> bool:
    test = root.parent.parent / "scripts" / "test.sh"
    text = test.read_text() if test.exists() else ""
    return all(re.search(rf"^ruff {cmd}\b.*\bscripts\b", text, re.M) for cmd in ("check", "format"))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--root", type=Path, default=ROOT, help="the package folder to measure")
    args = parser.parse_args()
    root = args.root.resolve()
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    lines = {name: len(p.read_text().splitlines()) for name, p in modules.items()}
    functions = []
    for name, p in modules.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    functions.sort(reverse=True)
    branches = []
    for name, p in modules.items():
        if name.startswith("flashback.engines"):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if ENGINE_KIND.search(line):
                branches.append(f"{p.relative_to(root.parent)}:{i}: {line.strip()}")
    graph = {name: {m for m in imports(p) if m in modules and m != name} for name, p in modules.items()}
    report = {
        "total_lines": sum(lines.values()),
        "modules": len(modules),
        "lines": dict(sorted(lines.items(), key=lambda kv: -kv[1])),
        "largest_functions": [{"lines": n, "function": f} for n, f in functions[:10]],
        f"functions_over_{LIMIT}_lines": [f for n, f in functions if n > LIMIT],
        "engine_kind_checks_outside_engines": branches,
        "import_cycles": cycles(graph),
        "private_names_imported": {name: found for name, p in modules.items() if (found := private_imports(p))},
        "setup_steps_called_outside_engines_load": setup_callers(modules),
        "ruff_covers_scripts": lint_covers_scripts(root),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['total_lines']} lines in {report['modules']} modules")
    for name, n in report["lines"].items():
        print(f"  {n:5d}  {name}")
    print("largest functions:")
    for row in report["largest_functions"]:
        print(f"  {row['lines']:5d}  {row['function']}")
    print(f"functions over {LIMIT} lines: {report[f'functions_over_{LIMIT}_lines'] or 'none'}")
    print(f"engine-kind checks outside engines/: {len(branches)}")
    for b in branches:
        print(f"  {b}")
    print(f"import cycles: {report['import_cycles'] or 'none'}")
    print(f"private names imported from another module: {report['private_names_imported'] or 'none'}")
    print(f"set-up steps called outside engines.load: {report['setup_steps_called_outside_engines_load'] or 'none'}")
    print(f"ruff covers scripts/: {report['ruff_covers_scripts']}")


if __name__ == "__main__":
    main()
