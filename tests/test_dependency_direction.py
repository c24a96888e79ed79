"""The package dependency rules of DESIGN.md, checked by walking every import in every package.

Each package may import only the standard library, itself, and the import names of the
distributions its own ``pyproject.toml`` declares (extras included). The declared dependencies
are in turn checked against the direction in DESIGN.md, so a new import needs a declared
dependency, and a declared dependency has to be allowed by the architecture.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["align-losses", "align-data", "align-core", "align-kd", "align-cli"]

# Distribution name -> the top-level module it provides.
IMPORT_NAMES = {
    "torch": "torch",
    "numpy": "numpy",
    "tokenizers": "tokenizers",
    "sentencepiece": "sentencepiece",
    "jinja2": "jinja2",
    "pyarrow": "pyarrow",
    "megatron-core": "megatron",
    "pyyaml": "yaml",
    "psutil": "psutil",
    "transformer-engine": "transformer_engine",
    "typer": "typer",
    "hydra-core": "hydra",
    "omegaconf": "omegaconf",
    "rich": "rich",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
    "safetensors": "safetensors",
    **{dist: dist.replace("-", "_") for dist in PACKAGES},
}

# DESIGN.md: which distributions each package may depend on at all.
ALLOWED_DEPENDENCIES = {
    "align-losses": {"torch"},
    "align-data": {"torch", "numpy", "tokenizers", "sentencepiece", "jinja2", "pyarrow"},
    "align-core": {
        "align-losses",
        "align-data",
        "megatron-core",
        "torch",
        "numpy",
        "pyyaml",
        "psutil",
        "safetensors",
        "transformer-engine",
    },
    "align-kd": {"align-core", "align-losses", "align-data", "torch", "numpy"},
    "align-cli": {
        "align-core",
        "align-kd",
        "align-losses",
        "align-data",
        "torch",
        "numpy",
        "typer",
        "hydra-core",
        "omegaconf",
        "rich",
        "matplotlib",
        "tensorboard",
        "pyyaml",
    },
}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def declared_dependencies(dist: str) -> set[str]:
    project = tomllib.loads((ROOT / "packages" / dist / "pyproject.toml").read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_requirement_name(r) for r in requirements}


def imported_modules(dist: str) -> dict[str, list[str]]:
    """Top-level module name -> the ``file:line`` places that import it."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "packages" / dist / "src").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                place = f"{path.relative_to(ROOT)}:{node.lineno}"
                found.setdefault(name.split(".")[0], []).append(place)
    return found


@pytest.mark.parametrize("dist", PACKAGES)
def test_declared_dependencies_follow_design(dist: str) -> None:
    unexpected = declared_dependencies(dist) - ALLOWED_DEPENDENCIES[dist]
    assert not unexpected, f"{dist} declares dependencies DESIGN.md does not allow: {unexpected}"


@pytest.mark.parametrize("dist", PACKAGES)
def test_imports_are_declared(dist: str) -> None:
    own = dist.replace("-", "_")
    allowed = {own} | {IMPORT_NAMES[d] for d in declared_dependencies(dist)}
    bad = {
        module: places
        for module, places in imported_modules(dist).items()
        if module not in allowed and module not in sys.stdlib_module_names
    }
    assert not bad, f"{dist} imports modules it does not declare: {bad}"


def test_nothing_imports_the_cli() -> None:
    for dist in PACKAGES[:-1]:
        assert "align_cli" not in imported_modules(dist), dist


def test_align_losses_needs_only_torch() -> None:
    assert declared_dependencies("align-losses") == {"torch"}
