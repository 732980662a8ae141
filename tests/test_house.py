"""The rules of the house, read from the source (benchmarks/house.py's static numbers): vit never imports
pipeline, no import cycles, no back-up arrow that runs (a type-only annotation of a section handed down as a
value is listed apart), no module over 600 lines, every function-level import heavy (a module of
pyproject.toml's banned-module-level-imports, or a project module that loads one at its top). The last tests
run the checker on small made-up trees, so that the others cannot pass by finding nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.house import (
    DESIGN_HEAVY,
    MAX_LINES,
    Module,
    backup_arrows,
    function_imports,
    heavy_list,
    import_cycles,
    scan_tree,
    size_numbers,
)

REPO = Path(__file__).resolve().parents[1]


def vit_imports_of_pipeline(modules: dict[str, Module]) -> list[str]:
    """Every import in vit/ of a pipeline module (type-only ones too), as file:line."""
    return [
        f"{module.path}:{statement.line} {statement.text}"
        for module in modules.values()
        if module.name.split(".")[0] == "vit"
        for statement in module.imports
        if any(target.split(".")[0] == "pipeline" for target in statement.targets)
    ]


@pytest.fixture(scope="module")
def house() -> dict[str, Module]:
    return scan_tree(REPO)


def test_vit_never_imports_pipeline(house):
    found = vit_imports_of_pipeline(house)
    assert not found, "\n".join(found)


def test_no_import_cycles(house):
    found = [" <-> ".join(cycle["modules"]) for cycle in import_cycles(house)]
    assert not found, "\n".join(found)


def test_no_back_up_arrows(house):
    found = [f"{a['at']} {a['arrow']} [{a['why']}]" for a in backup_arrows(house) if not a["type_only"]]
    assert not found, "\n".join(found)


def test_no_module_of_pipeline_or_vit_is_over_600_lines(house):
    found = [f"{module['path']} ({module['lines']})" for module in size_numbers(house)["over_600"]]
    assert not found, "\n".join(found)


def test_every_function_level_import_is_heavy(house):
    found = [f"{i['at']} {i['import']}" for i in function_imports(house)["light"]]
    assert not found, "\n".join(found)


TOY_TREE = {
    "vit/__init__.py": "",
    "vit/model.py": "import torch\n",
    "vit/leak.py": "from pipeline.console import say\n",  # vit importing pipeline: layer 0 -> 1
    "pipeline/__init__.py": "",
    "pipeline/console.py": "def say():\n    import json\n",  # a light function-level import
    "pipeline/loop_a.py": "from pipeline import loop_b\n",  # `from pkg import mod`: the submodule
    "pipeline/loop_b.py": "def f():\n    import pipeline.loop_a\n",  # the cycle closed in a function: light
    "pipeline/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pipeline.cli\n",
    "pipeline/config/__init__.py": "from pipeline.config.base import X\n",
    "pipeline/config/base.py": "X = 1\n",
    "pipeline/pretrain/__init__.py": "",
    "pipeline/pretrain/launch.py": "from pipeline.config import X\nimport ray\n",  # the Ray side gets config
    "pipeline/runner/__init__.py": "",
    "pipeline/runner/execute.py": "from pipeline.pretrain.launch import X\n",  # heavy through launch's ray
    "pipeline/cli.py": (
        "def run():\n    from pipeline.runner.execute import X\n"  # heavy, transitively
        "def model():\n    from vit.model import torch\n"  # heavy: vit.model imports torch
        + "x = 1\n"
        * (MAX_LINES - 3)
    ),
}


def write_tree(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return scan_tree(root)


def test_the_checker_finds_a_cycle_a_back_up_arrow_and_a_light_function_level_import(tmp_path):
    modules = write_tree(tmp_path, TOY_TREE)
    assert vit_imports_of_pipeline(modules) == ["vit/leak.py:1 from pipeline.console import say"]
    assert [c["modules"] for c in import_cycles(modules)] == [["pipeline.loop_a", "pipeline.loop_b"]]
    arrows = {a["arrow"]: a["why"] for a in backup_arrows(modules)}
    assert [a["arrow"] for a in backup_arrows(modules) if a["type_only"]] == [
        "pipeline.typed -> pipeline.cli"
    ]
    assert arrows == {
        "vit.leak -> pipeline.console": "layer 0 -> 1",
        "pipeline.typed -> pipeline.cli": "layer 1 -> 5 (type-only)",
        "pipeline.pretrain.launch -> pipeline.config": "launch gets config",
    }
    heavy = heavy_list(tmp_path)  # no pyproject.toml: DESIGN's list
    assert (heavy.source, heavy.modules) == ("DESIGN", frozenset(DESIGN_HEAVY))
    imports = function_imports(modules, heavy)
    assert [i["at"] for i in imports["light"]] == ["pipeline/console.py:2", "pipeline/loop_b.py:2"]
    assert {i["at"]: i["why"] for i in imports["heavy"]} == {
        "pipeline/cli.py:2": "pipeline.runner.execute -> pipeline.pretrain.launch -> ray",
        "pipeline/cli.py:4": "vit.model -> torch",
    }
    assert size_numbers(modules)["over_600"] == [{"path": "pipeline/cli.py", "lines": MAX_LINES + 1}]


def test_the_heavy_list_is_read_from_the_trees_pyproject(tmp_path):
    modules = write_tree(
        tmp_path,
        {
            "pyproject.toml": (
                "[tool.ruff.lint.flake8-tidy-imports]\n"
                'banned-module-level-imports = ["safetensors.torch", "pipeline.slow"]\n'
            ),
            "pipeline/__init__.py": "",
            "pipeline/slow.py": "X = 1\n",  # listed, though it imports nothing heavy
            "pipeline/a.py": (
                "def f():\n    import torch\n"  # light here: torch is not on this list
                "def g():\n    from safetensors.torch import save_file\n"  # listed
                "def h():\n    import safetensors\n"  # its parent is not
                "def i():\n    from pipeline.slow import X\n"  # a listed project module
            ),
        },
    )
    heavy = heavy_list(tmp_path)
    assert heavy.source == "pyproject.toml"
    imports = function_imports(modules, heavy)
    assert [i["at"] for i in imports["light"]] == ["pipeline/a.py:2", "pipeline/a.py:6"]
    assert {i["at"]: i["why"] for i in imports["heavy"]} == {
        "pipeline/a.py:4": "safetensors.torch",
        "pipeline/a.py:8": "pipeline.slow (listed)",
    }
