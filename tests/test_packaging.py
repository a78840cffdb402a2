"""The distribution declares what the code imports, and nothing it does not; the README's test command is
the one CI runs.

Every import in the package and its tests is mapped to the distribution that provides it (from the
installed distributions' metadata); a third-party import whose distribution is not declared in
pyproject.toml (dependencies or an extra) fails here, and so does a declared distribution that nothing
imports, unless it is a tool or plugin listed below with the reason nothing imports it.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Declared distributions that are used without an `import` in the code, and why.
NOT_IMPORTED = {
    "pytest-timeout": "pytest plugin (the `timeout` ini option)",
    "grpcio-tools": "protos/generate.py runs `python -m grpc_tools.protoc`",
    "ruff": "linter .ci/run runs",
    "mypy": "type checker .ci/run runs",
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_canon(_name(r)) for r in reqs}


def _source_files() -> list[Path]:
    folders = _pyproject()["tool"]["setuptools"]["package-dir"].values()
    files = []
    for folder in folders:
        files += [p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts]
    return files


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "importorskip"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value).split(".")[0])
    return names


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level module name -> the files that import it, for modules outside stdlib and this project."""
    found: dict[str, list[str]] = {}
    for path in _source_files():
        for name in _top_level_imports(path):
            if name in sys.stdlib_module_names or name in ("splitserve", "__future__"):
                continue
            found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared() -> None:
    declared = _declared()
    providers = md.packages_distributions()
    missing = {}
    for module, files in _third_party_imports().items():
        dists = {_canon(d) for d in providers.get(module, [])}
        if not dists:
            missing[module] = (files, "no installed distribution provides it")
        elif not dists & declared:
            missing[module] = (files, f"provided by {sorted(dists)}, none declared")
    assert not missing, f"imports not declared in pyproject.toml: {missing}"


def test_every_declared_distribution_is_used() -> None:
    providers = md.packages_distributions()
    imported = set()
    for module in _third_party_imports():
        imported |= {_canon(d) for d in providers.get(module, [])}
    unused = _declared() - imported - set(NOT_IMPORTED)
    assert not unused, f"declared in pyproject.toml but imported nowhere: {sorted(unused)}"
    assert "tqdm" not in _declared()


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in setup.strip().splitlines()]
    assert len(commands) == 2, "the README's set-up block has exactly two commands"
    test_command = commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1].strip() == test_command, "the last line of .ci/run is the README's test command"
    # The first README command installs the same extras CI installs.
    extras = re.search(r'pip install -e "(\.\[[^\]]+\])"', commands[0])
    assert extras is not None
    assert any(f'pip install -q -e "{extras.group(1)}"' in line for line in ci)
    # CI installs into a fresh virtual environment that does not see the system's packages.
    assert any(line.strip().startswith("python3 -m venv ") for line in ci)
    assert "system-site-packages" not in "\n".join(ci)
