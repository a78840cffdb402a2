"""mypy over the package, module by module as `splitserve.<folder>`.

Each top-level folder is the package `splitserve.<folder>` (pyproject's [tool.setuptools] package-dir), which
mypy cannot see through setuptools' editable finder; so this links the folders into a temporary
`splitserve/` and checks them there (tests excluded), with the [tool.mypy] settings of pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    config = ROOT / "pyproject.toml"
    package_dir = tomllib.loads(config.read_text())["tool"]["setuptools"]["package-dir"]
    with tempfile.TemporaryDirectory(prefix="splitserve-mypy-") as tmp:
        tree = Path(tmp) / "splitserve"
        tree.mkdir()
        args = []
        for module, folder in sorted(package_dir.items()):
            name = module.removeprefix("splitserve.")
            if name == "tests":
                continue
            (tree / name).symlink_to(ROOT / folder, target_is_directory=True)
            args += ["-p", module]
        cache = ["--cache-dir", str(ROOT / ".mypy_cache")]  # .gitignored
        return subprocess.call([sys.executable, "-m", "mypy", "--config-file", str(config), *cache, *args], cwd=tmp)


if __name__ == "__main__":
    sys.exit(main())
