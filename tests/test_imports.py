"""The pipeline runs one way: no stage imports a later one (function-level imports included)."""

import ast
from pathlib import Path

import memplan

# stages in pipeline order; a module may import its own stage and earlier ones. The package root (the public
# API) and testing/ (test support) may import anything; no stage imports testing/.
ORDER = ["errors", "units", "_imports", "_proc", "spec", "formats", "predict", "build", "trace", "fit", "probe", "tune",
         "run", "cli", "__main__"]
BASE = {"errors": 0, "units": 0, "_imports": 0, "_proc": 0}
ROOT = Path(memplan.__file__).parent


def _stage(parts: list[str]) -> str | None:
    return parts[0].removesuffix(".py") if parts else None


def _rank(stage: str) -> int:
    return BASE.get(stage, ORDER.index(stage))


def test_no_stage_imports_a_later_one():
    wrong = []
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).parts)
        stage = _stage(parts)
        if stage in ("__init__", "testing"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                if not name.startswith("memplan."):
                    continue
                target = name.split(".")[1]
                if target == "testing" or target != "__init__" and _rank(target) > _rank(stage):
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, wrong
