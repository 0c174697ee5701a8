"""The package seams of GUIDE.md, read from the imports of every module (``ast``, no import run).

* ``models``, ``guidance``, ``data`` and ``metrics`` never import ``engine``, ``inference`` or
  omegaconf/hydra: constructors take objects, and only ``engine`` turns config into objects;
* ``data`` and ``inference`` never import each other (both may use ``models`` and ``guidance``);
* ``guidance`` is on the models/metrics floor: it imports neither ``data`` nor ``models``;
* ``models`` never import ``guidance``: a network receives SAM's encoder, built by the engine;
* ``segment_anything`` is imported by ``samsr.guidance`` alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "samsr"

_CONFIG = ("omegaconf", "hydra")
FORBIDDEN = {
    "models": ("samsr.engine", "samsr.inference", "samsr.guidance", "samsr.data", *_CONFIG),
    "guidance": ("samsr.engine", "samsr.inference", "samsr.data", "samsr.models", *_CONFIG),
    "data": ("samsr.engine", "samsr.inference", *_CONFIG),
    "metrics": ("samsr.engine", "samsr.inference", "samsr.data", *_CONFIG),
    "inference": ("samsr.engine", "samsr.data", *_CONFIG),
}
ONLY_IN_GUIDANCE = ("segment_anything",)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, top-level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _hits(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks a seam, as ``file:line imports module``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        package = rel.parts[0] if len(rel.parts) > 1 else None
        for line, module in imports_of(path):
            banned = FORBIDDEN.get(package, ())
            if package != "guidance":
                banned = banned + ONLY_IN_GUIDANCE
            if _hits(module, banned):
                out.append(f"samsr/{rel}:{line} imports {module}")
    return out


def test_the_package_seams_hold():
    assert violations() == []


@pytest.mark.parametrize(
    ("where", "line"),
    [
        ("data/x.py", "from samsr.inference.refiner import Refiner"),
        ("inference/x.py", "import samsr.data.io"),
        ("models/x.py", "from segment_anything import sam_model_registry"),
        ("models/x.py", "from samsr.guidance.build import image_encoder"),
        ("guidance/x.py", "from samsr.data.io import read_image"),
        ("metrics/x.py", "from omegaconf import DictConfig"),
        ("engine/x.py", "    from segment_anything import SamPredictor"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path, where, line):
    path = tmp_path / where
    path.parent.mkdir(parents=True)
    path.write_text(
        "def f():\n    pass\n" + (line if not line.startswith(" ") else "def g():\n" + line) + "\n"
    )
    assert len(violations(tmp_path)) == 1


def test_allowed_imports_pass(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ok.py").write_text(
        "from samsr.guidance.maps import map_seed\nfrom samsr.models.crm import CRM\n"
    )
    (tmp_path / "guidance").mkdir()
    (tmp_path / "guidance" / "ok.py").write_text("from segment_anything import SamPredictor\n")
    assert violations(tmp_path) == []
