"""The house's one rule, checked from the source: imports point one way.

Every `import` of every project module is read with ast, those inside functions included (a
function-level import runs as surely as a top-level one, only later). The project's modules must
form no circle; an extras module never imports a command; no module hands a module object around
(sys.modules, importlib, __import__, a module passed as an argument). The checker is tried on
small made-up trees first, so that a check that could never fail would fail here.
"""
import ast
import os

from conftest import ROOT

COMMANDS = {"train", "predict", "evaluate", "export", "app"}


def project_modules(root):
    """{module name: path} of the top-level modules and the extras package."""
    found = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            found[name[:-3]] = os.path.join(root, name)
    extras = os.path.join(root, "extras")
    for name in sorted(os.listdir(extras)) if os.path.isdir(extras) else []:
        if name.endswith(".py"):
            module = "extras" if name == "__init__.py" else f"extras.{name[:-3]}"
            found[module] = os.path.join(extras, name)
    return found


def imports_of(tree, modules):
    """The project modules a parsed module imports, anywhere in it, and the names it binds to
    module objects (what `import x` or `from extras import y` puts in its namespace)."""
    edges, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    edges.add(alias.name)
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                edges.add(node.module)
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in modules:  # from extras import cache: the module extras.cache
                    edges.add(full)
                    bound.add(alias.asname or alias.name)
    return edges, bound


def handed_around(tree, bound):
    """Lines where a module object is handed around, or found by name at run time."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Subscript, ast.Call)) and "sys.modules" in ast.unparse(
                node.value if isinstance(node, ast.Subscript) else node.func):
            found.append((node.lineno, "sys.modules"))  # a module object looked up by name
        elif isinstance(node, ast.Name) and node.id == "__import__" or \
                isinstance(node, ast.Attribute) and node.attr == "import_module":
            found.append((node.lineno, "an import by name (importlib / __import__)"))
        elif isinstance(node, ast.ImportFrom) and node.module == "importlib" and \
                any(a.name == "import_module" for a in node.names):
            found.append((node.lineno, "an import by name (importlib / __import__)"))
        elif isinstance(node, ast.Call):
            args = [*node.args, *(k.value for k in node.keywords)]
            for arg in args:
                if isinstance(arg, ast.Name) and arg.id in bound:
                    found.append((node.lineno, f"module {arg.id} passed as an argument"))
    return found


def check(sources):
    """The rule's breaches in {module name: source text}: a list of one-line strings."""
    modules = set(sources)
    graph, problems = {}, []
    for name, text in sources.items():
        tree = ast.parse(text)
        edges, bound = imports_of(tree, modules)
        edges.discard(name)
        graph[name] = edges - ({"extras"} if name.startswith("extras.") else set())
        if name.startswith("extras.") and edges & COMMANDS:
            problems.append(f"{name} imports the command {sorted(edges & COMMANDS)[0]}")
        problems += [f"{name}:{line}: {what}" for line, what in handed_around(tree, bound)]
    # A circle is a path back to where it started: depth-first search with a stack of the path.
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                problems.append("circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return problems


def test_the_checker_finds_each_breach():
    tree = {
        "data": "def main():\n    from extras import data_check\n",
        "extras": "",
        "extras.data_check": "import data\n",
        "predict": "import common\n",
        "common": "",
        "extras.review": "def f():\n    import predict\n",
        "evaluate": "import sys\nfrom extras import sources\n"
                    "def main():\n    sources.score(sys.modules[__name__])\n",
        "extras.sources": "",
        "export": "import evaluate\nevaluate.run(evaluate)\n",
        "train": "import importlib\nm = importlib.import_module('data')\n",
    }
    problems = check(tree)
    assert "circle: data -> extras.data_check -> data" in problems
    assert "extras.review imports the command predict" in problems
    assert any("evaluate:4: sys.modules" == p for p in problems)
    assert any(p.startswith("export:2: module evaluate passed") for p in problems)
    assert "train:2: an import by name (importlib / __import__)" in problems
    # and a tree that keeps the rule passes
    assert check({"common": "", "data": "import common\n", "train": "import data, common\n",
                  "extras": "", "extras.budget": "import common\n",
                  "evaluate": "import importlib.util\nimportlib.util.find_spec('x')\n"}) == []


def test_imports_point_one_way():
    """Zero circles among the project's modules (function-level imports included), no extras
    module imports a command, no module object is handed around."""
    sources = {}
    for name, path in project_modules(ROOT).items():
        with open(path, encoding="utf-8") as f:
            sources[name] = f.read()
    assert {"train", "data", "unet", "evaluate", "export", "extras.step_forms"} <= set(sources)
    problems = check(sources)
    assert not problems, "\n".join(problems)
