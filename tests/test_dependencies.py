"""pyproject.toml declares exactly the third-party packages that rear_ds imports (issue 17 item 3)."""
import ast
import importlib.metadata
import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _catches_import_error(node: ast.Try) -> bool:
    names = []
    for h in node.handlers:
        t = h.type
        names += [e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names))


def rear_ds_imports() -> tuple:
    """{top-level module: files} of the absolute imports in rear_ds/, and the modules imported only inside a
    try whose except catches ImportError (optional ones)."""
    found, optional_only = {}, {}
    for folder, _, files in os.walk(os.path.join(ROOT, "rear_ds")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            tree = ast.parse(open(path).read(), path)
            guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and _catches_import_error(t)
                       for b in t.body for n in ast.walk(b)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    found.setdefault(top, set()).add(os.path.relpath(path, ROOT))
                    optional_only[top] = optional_only.get(top, True) and id(node) in guarded
    return found, {m for m, opt in optional_only.items() if opt}


def declared_requirements() -> set:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in deps}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_declared_packages_are_the_imported_ones():
    found, optional = rear_ds_imports()
    third_party = {m: f for m, f in found.items()
                   if m not in sys.stdlib_module_names and m not in ("rear_ds", "__future__")}
    dists = importlib.metadata.packages_distributions()
    unknown = sorted(m for m in third_party if m not in dists and m not in optional)  # apex may be absent
    assert not unknown, f"imported by rear_ds but not installed here: {unknown}"
    required = {_norm(dists[m][0]): m for m in third_party if m not in optional}
    declared = declared_requirements()
    missing = {d: sorted(third_party[m]) for d, m in required.items() if d not in declared}
    assert not missing, f"imported by rear_ds but not in pyproject.toml's dependencies: {missing}"
    imported = set(required) | {_norm(d) for m in optional if m in dists for d in dists[m]}
    unused = sorted(declared - imported)
    assert not unused, f"in pyproject.toml's dependencies but never imported by rear_ds: {unused}"
    assert "webdataset" in required and "rear_ds/data/shards.py" in third_party["webdataset"]  # really used
    assert optional & set(third_party) == {"apex"}  # the one optional package (not on the package index)


def test_the_installed_versions_are_inside_the_declared_ranges():
    """The ranges state what was tested: the suite must run with versions inside them (pytest depends on
    packaging, so it is there wherever the tests run)."""
    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    outside = {str(r): importlib.metadata.version(r.name) for r in reqs
               if not r.specifier.contains(importlib.metadata.version(r.name), prereleases=True)}
    assert not outside, f"installed versions outside pyproject.toml's ranges: {outside}"
    unbounded = [str(r) for r in reqs if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert not unbounded, f"ranges without an upper bound: {unbounded}"
    assert sys.version_info[:2] >= (3, 11) and project["requires-python"] == ">=3.11"
