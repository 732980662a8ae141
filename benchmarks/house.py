"""The house in numbers: how big pipeline/ and vit/ are, how their modules import each other, and how many
files a sample and a learning rate cross. Writes benchmarks/results/house.json.

    .venv/bin/python benchmarks/house.py                 # this working tree
    .venv/bin/python benchmarks/house.py --at 31aa73b    # and another revision, side by side

How each number is measured (every module is a .py file under pipeline/ or vit/, named as Python imports it;
a package's __init__.py is the package):

1. Size: the count of modules, their lines (newlines, as `wc -l`), the largest module, and every module
   over 600 lines (target: none).
2. Function-level imports: every `import`/`from ... import` statement inside a function or method body
   (AST). It is heavy when every module it names is heavy: a module of the heavy list or a submodule of one
   (`torch.nn` of `torch`; `safetensors.torch`, listed, but not `safetensors`), or a project module that
   loads one when imported. The heavy list is the measured tree's own: its pyproject.toml's
   `[tool.ruff.lint.flake8-tidy-imports] banned-module-level-imports`, the modules ruff keeps off a
   module's top (TID253) and so the only ones a function may import (PLC0415). A tree whose pyproject.toml
   has none (a revision before that rule) gets DESIGN's list instead (DESIGN_HEAVY: torch, deepspeed, ray,
   matplotlib, mlflow, wandb, transformers, safetensors), and the table says which list a tree got. Ray
   counts whole: DESIGN names "ray train/data", but every `ray.*` import loads `ray` itself first (0.6 s
   here, half of torch's 1.3 s), so no ray import is light. "Loads when imported" is the import graph's
   closure over top-level imports (module body and class bodies, not functions, not `if TYPE_CHECKING:`),
   where importing `a.b.c` also runs `a` and `a.b`: `pipeline.runner.execute` imports ray at its top, so a
   function importing it makes a heavy import. A project module the list names is heavy even when no
   chain shows it (its why then ends in "(listed)"). Target: no light one.
3. Import cycles: strongly connected components (Tarjan) of the module graph of every import that runs
   (top-level and function-level; `if TYPE_CHECKING:` imports never run and are left out), with
   `from pkg import name` resolved to the submodule `pkg.name` when that is a module. Target 0.
4. Back-up arrows: imports that run (top-level or in a function) from a module to one of a higher
   layer: 0 vit; 1 pipeline's shared base (the `pipeline` package and every module directly in pipeline/
   but cli.py); 2 pipeline.config (module or package, alike); 3 the stages pipeline.{datasets, preprocess,
   pretrain, transfer, study, analysis} (a stage importing another is sideways); 4 pipeline.runner;
   5 pipeline.cli. Also an arrow: a stage's Ray side (launch.py, worker.py, task.py, feed.py) importing
   pipeline.config ("a launch receives a plan, not the config"). Target 0. Type-only imports (`if
   TYPE_CHECKING:`: a section handed down as a value, named in an annotation) never run; they are counted
   apart, as "type-only", and listed.
5. Files a sample crosses from tar to loss: a WebDataset tar of a few PNGs with .cls labels is written
   (tarfile, Pillow: no project code), then three calls run under `sys.settrace` (and `threading.settrace`,
   for the feed's reader threads): the Ray-free core that preprocesses one shard into a patch file; the
   pretraining feed's first micro-batch of that file, in-process; the training objective's loss on it with
   a tiny ViT. Counted: the project source files whose functions are called during those calls, not while
   a module is being imported. Setup (listing the shard, building the model and recipe, the feed's plan)
   is not recorded. The entry points are the `*_entry` functions below. Target <= 10.
6. Files the pretraining learning rate crosses from the YAML job to the optimizer: a job YAML with
   lr 0.000123457 is loaded with pipeline.config.load_config, planned (check_pretrain, worker_settings: on
   a patch folder made as in 5), then what a Ray Train worker does with the settings' recipe to build its
   optimizer is done in-process (build_model, build_engine on a one-rank gloo group: DeepSpeed ZeRO over
   vit.objective.make_optimizer). Under `sys.settrace`, a project file counts when a function of it is
   called with the lr in its arguments, or in their attributes down to depth 3 (dataclass fields, pydantic
   fields, dict values); the optimizer's groups must end with the lr. pipeline/pretrain/worker.py, which is
   not run, counts when its source hands `settings.plan.recipe` (earlier `settings.recipe`) on. Not run
   either (they need Ray): the runner's step and the stage's launch, between the plan and worker_settings
   in a real run; where they receive the config, the lr crosses them uncounted (a lower bound). In 5 and 6
   each file of a package counts: a module split in four (pipeline/config/) counts as many times as the
   sample or the lr crosses its parts.
   Target <= 5.
7. `--at REV`: REV's tree (`git archive REV | tar -x`) measured by this same script in a subprocess (cwd and
   PYTHONPATH the extracted tree, this venv's Python, the editable install's finder dropped so that nothing
   is imported from this checkout; 5 and 6 are n/a when something was). The entry points try a module's
   earlier name too (vit.models for vit.build, vit.step for vit.objective) and pass a function only the
   arguments its signature names (`call_with`); a measurement that still cannot run on a tree is
   "n/a (why)". The JSON holds both trees' numbers ("here", "at").

Only imports of the measured tree stay in this script's functions (pipeline, vit, and benchmarks.machine,
which imports pipeline.info): under `--at` they must come from the other revision's tree, where a module may
be missing or differ. Every other import is at the top.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import tomllib
import torch
import torch.distributed as dist
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "vit")
MAX_LINES = 600
DESIGN_HEAVY = ("torch", "deepspeed", "ray", "matplotlib", "mlflow", "wandb", "transformers", "safetensors")
STAGES = frozenset({"datasets", "preprocess", "pretrain", "transfer", "study", "analysis"})
RAY_SIDE = frozenset({"launch.py", "worker.py", "task.py", "feed.py"})  # a stage's modules Ray runs
SENTINEL_LR = 0.000123457
TARGETS = {  # the table's rows that have a target
    "modules over 600 lines": "0",
    "  light": "0",
    "import cycles": "0",
    "back-up arrows": "0",
    "files: tar -> loss": "<= 10",
    "files: lr YAML -> optimizer": "<= 5",
}


# ---------------------------------------------------------------- the tree: modules and their imports


@dataclass(frozen=True)
class Import:
    """One import statement of a module: the project modules or third-party names it loads, and where it
    sits: "top" (runs on import), "function" (runs when called) or "type" (under TYPE_CHECKING: never)."""

    source: str
    line: int
    kind: str
    targets: tuple[str, ...]
    text: str


@dataclass
class Module:
    """One .py file of pipeline/ or vit/: its import name, path, size and import statements."""

    name: str
    path: str  # relative to the tree's root
    lines: int
    is_package: bool
    imports: list[Import] = field(default_factory=list)


def module_name(relative: Path) -> str:
    """`pipeline/pretrain/plan.py` -> `pipeline.pretrain.plan`; a package's `__init__.py` -> the package."""
    parts = list(relative.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan_tree(root: Path) -> dict[str, Module]:
    """Every module of pipeline/ and vit/ under `root`, with its lines and its imports resolved."""
    modules: dict[str, Module] = {}
    sources: dict[str, ast.Module] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            text = path.read_text(encoding="utf-8")
            name = module_name(relative)
            modules[name] = Module(name, relative.as_posix(), text.count("\n"), path.name == "__init__.py")
            sources[name] = ast.parse(text, filename=str(relative))
    for name, tree in sources.items():
        modules[name].imports = _ImportVisitor(modules[name], set(modules)).collect(tree)
    return modules


class _ImportVisitor(ast.NodeVisitor):
    """Collects a module's import statements, knowing whether each is in a function or under TYPE_CHECKING."""

    def __init__(self, module: Module, known: set[str]) -> None:
        """`known`: every module of the tree, to tell `from pkg import mod` from `from mod import name`."""
        self.module, self.known = module, known
        self.functions, self.type_only = 0, 0
        self.found: list[Import] = []

    def collect(self, tree: ast.Module) -> list[Import]:
        """The module's import statements, in source order."""
        self.visit(tree)
        return self.found

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        """An import anywhere in a function's body is a function-level one (nested functions too)."""
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        """As a plain function."""
        self.visit_FunctionDef(node)

    def visit_If(self, node: ast.If) -> None:
        """The body of `if TYPE_CHECKING:` is type-only (it never runs); its `else:` runs."""
        test = ast.unparse(node.test)
        if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            self.type_only += 1
            for child in node.body:
                self.visit(child)
            self.type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        """`import a.b` loads module `a.b`."""
        self._add(node, tuple(alias.name for alias in node.names))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        """`from pkg import x` loads `pkg.x` when that is a module of the tree, else `pkg`."""
        base = _absolute(node, self.module)
        names = [f"{base}.{alias.name}" for alias in node.names]
        self._add(node, tuple(dict.fromkeys(n if n in self.known else base for n in names)))

    def _add(self, node: ast.Import | ast.ImportFrom, targets: tuple[str, ...]) -> None:
        """Record the statement with where it sits: type-only, in a function, or at the top."""
        kind = "type" if self.type_only else "function" if self.functions else "top"
        self.found.append(Import(self.module.name, node.lineno, kind, targets, ast.unparse(node)))


def _absolute(node: ast.ImportFrom, module: Module) -> str:
    """The module a `from X import ...` names, relative imports made absolute."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def is_project(name: str) -> bool:
    """Whether a dotted name is in pipeline/ or vit/."""
    return name.split(".")[0] in PACKAGES


def ancestors(name: str) -> list[str]:
    """The packages importing `name` runs first: `a.b.c` -> [`a`, `a.b`]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# ---------------------------------------------------------------- 1. size


def size_numbers(modules: dict[str, Module]) -> dict[str, Any]:
    """Module count, total lines, the largest module and every module over MAX_LINES."""
    ordered = sorted(modules.values(), key=lambda m: (-m.lines, m.path))
    return {
        "modules": len(modules),
        "lines": sum(m.lines for m in ordered),
        "largest": {"path": ordered[0].path, "lines": ordered[0].lines} if ordered else None,
        "over_600": [{"path": m.path, "lines": m.lines} for m in ordered if m.lines > MAX_LINES],
    }


# ---------------------------------------------------------------- 2. function-level imports


@dataclass(frozen=True)
class HeavyList:
    """The heavy modules of a tree (a function may import them, nothing else), and where the list is from."""

    modules: frozenset[str]
    source: str  # "pyproject.toml" or "DESIGN"
    why: str = ""  # why DESIGN's: what the tree's pyproject.toml lacks

    def names(self, module: str) -> bool:
        """Whether `module` is on the list, or a submodule of one that is (`torch.nn` of `torch`)."""
        return module in self.modules or any(parent in self.modules for parent in ancestors(module))


def heavy_list(root: Path) -> HeavyList:
    """The tree's `[tool.ruff.lint.flake8-tidy-imports] banned-module-level-imports` (the older
    `[tool.ruff.flake8-tidy-imports]` too), or DESIGN's list, saying why, when its pyproject.toml has none."""
    path = root / "pyproject.toml"
    if not path.is_file():
        return HeavyList(frozenset(DESIGN_HEAVY), "DESIGN", "no pyproject.toml")
    try:
        ruff = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {}).get("ruff", {})
    except tomllib.TOMLDecodeError as error:
        return HeavyList(frozenset(DESIGN_HEAVY), "DESIGN", f"pyproject.toml unreadable: {error}")
    for table in (ruff.get("lint", {}), ruff):
        listed = table.get("flake8-tidy-imports", {}).get("banned-module-level-imports")
        if listed:
            return HeavyList(frozenset(listed), "pyproject.toml")
    return HeavyList(frozenset(DESIGN_HEAVY), "DESIGN", "pyproject.toml has no banned-module-level-imports")


def heavy_modules(modules: dict[str, Module], heavy: HeavyList) -> dict[str, list[str]]:
    """Each project module that loads a heavy module when imported, with the chain that does it
    (`pipeline.runner.execute` -> `ray`): a fixed point over top-level imports and parent packages. Then a
    project module the list names is heavy too where no chain showed it (`... (listed)`)."""
    chains: dict[str, list[str]] = {}
    _spread(modules, heavy, chains)
    listed = {name: [f"{name} (listed)"] for name in modules if heavy.names(name) and name not in chains}
    if listed:
        chains.update(listed)
        _spread(modules, heavy, chains)
    return chains


def _spread(modules: dict[str, Module], heavy: HeavyList, chains: dict[str, list[str]]) -> None:
    """Add to `chains` every module whose top-level imports or parent packages reach a heavy one, until
    none is added."""
    changed = True
    while changed:
        changed = False
        for name, module in modules.items():
            if name in chains:
                continue
            loads = [t for i in module.imports if i.kind == "top" for t in i.targets] + ancestors(name)
            chain = next((c for c in (_heavy_chain(t, heavy, chains) for t in loads) if c), None)
            if chain is not None:
                chains[name] = [name, *chain] if chain[0] != name else chain
                changed = True


def _heavy_chain(target: str, heavy: HeavyList, chains: dict[str, list[str]]) -> list[str] | None:
    """Why importing `target` is heavy (a chain ending in a heavy module), or None when it is not (yet)."""
    if not is_project(target):
        return [target] if heavy.names(target) else None
    for name in [*ancestors(target), target]:
        if name in chains:
            return chains[name]
    return None


def function_imports(modules: dict[str, Module], heavy: HeavyList | None = None) -> dict[str, Any]:
    """Every import statement in a function body, heavy (with why) or light (with file:line). `heavy`: the
    tree's heavy list (by default this checkout's)."""
    heavy = heavy_list(REPO) if heavy is None else heavy
    chains = heavy_modules(modules, heavy)
    found: dict[str, list[dict[str, Any]]] = {"heavy": [], "light": []}
    for module in modules.values():
        for statement in (i for i in module.imports if i.kind == "function"):
            why = [_heavy_chain(t, heavy, chains) for t in statement.targets]
            entry = {"at": f"{module.path}:{statement.line}", "import": statement.text}
            if all(why):
                found["heavy"].append({**entry, "why": " -> ".join(why[0] or [])})
            else:
                found["light"].append(entry)
    return {"count": len(found["heavy"]) + len(found["light"]), **found}


# ---------------------------------------------------------------- 3. import cycles


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Project module -> the project modules it imports in code that runs (top level and functions)."""
    return {
        name: {t for i in m.imports if i.kind != "type" for t in i.targets if t in modules and t != name}
        for name, m in modules.items()
    }


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (the import cycles), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        """Tarjan's depth-first step: number `node`, visit its successors, pop a component at its root."""
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def import_cycles(modules: dict[str, Module]) -> list[dict[str, Any]]:
    """Each cycle's modules and the imports that close it (file:line), for the report."""
    graph = import_graph(modules)
    cycles = []
    for members in strongly_connected(graph):
        inside = set(members)
        edges = [
            f"{modules[i.source].path}:{i.line} {i.source} -> {t}"
            for name in members
            for i in modules[name].imports
            if i.kind != "type"
            for t in i.targets
            if t in inside and t != name
        ]
        cycles.append({"modules": members, "imports": edges})
    return cycles


# ---------------------------------------------------------------- 4. back-up arrows


def layer_of(name: str) -> int:
    """0 vit, 1 pipeline's shared base, 2 pipeline.config, 3 the stages, 4 pipeline.runner, 5 pipeline.cli."""
    parts = name.split(".")
    if parts[0] == "vit":
        return 0
    second = parts[1] if len(parts) > 1 else ""
    layers = {"cli": 5, "runner": 4, "config": 2, **dict.fromkeys(STAGES, 3)}
    return layers.get(second, 1)


def is_ray_side(module: Module) -> bool:
    """A stage's module that Ray runs (launch, worker, task, feed): it should receive a plan."""
    parts = module.name.split(".")
    return len(parts) == 3 and parts[1] in STAGES and Path(module.path).name in RAY_SIDE


def backup_arrows(modules: dict[str, Module]) -> list[dict[str, Any]]:
    """Imports from a lower layer to a higher one, and the Ray side of a stage importing the config."""
    arrows = []
    for module in modules.values():
        for statement in module.imports:
            for target in filter(is_project, statement.targets):
                low, high = layer_of(module.name), layer_of(target)
                config = is_ray_side(module) and high == 2
                if high > low or config:
                    why = f"layer {low} -> {high}" if high > low else "launch gets config"
                    arrows.append(
                        {
                            "at": f"{module.path}:{statement.line}",
                            "arrow": f"{module.name} -> {target}",
                            "why": why + (" (type-only)" if statement.kind == "type" else ""),
                            "type_only": statement.kind == "type",
                        }
                    )
    return arrows


def static_metrics(root: Path) -> dict[str, Any]:
    """Numbers 1-4 of the tree at `root`, read from its source alone."""
    modules, heavy = scan_tree(root), heavy_list(root)
    return {
        "size": size_numbers(modules),
        "heavy_list": {"source": heavy.source, "why": heavy.why, "modules": sorted(heavy.modules)},
        "function_imports": function_imports(modules, heavy),
        "cycles": import_cycles(modules),
        "backup_arrows": backup_arrows(modules),
    }


# ---------------------------------------------------------------- finding a tree's functions


def project_function(modules: tuple[str, ...], name: str) -> Callable[..., Any]:
    """`name` from the first of `modules` that has it (a module's current name first, then earlier ones)."""
    for module in modules:
        with contextlib.suppress(ModuleNotFoundError):
            found = getattr(importlib.import_module(module), name, None)
            if found is not None:
                return found
    raise LookupError(f"no {name} in {' or '.join(modules)}")


def call_with(function: Callable[..., Any], **pool: Any) -> Any:
    """`function` called with the values of `pool` its signature names: a call that survives a parameter
    renamed or regrouped between revisions (`micro_batch` then, `batch` now) when the pool has both."""
    parameters = inspect.signature(function).parameters
    return function(**{name: value for name, value in pool.items() if name in parameters})


def batch_split(global_batch: int, micro_batch: int) -> Any:
    """vit.recipe.BatchSplit on one rank where the tree has it, else None (the tree passes sizes instead)."""
    split = getattr(importlib.import_module("vit.recipe"), "BatchSplit", None)
    return None if split is None else split(global_batch, micro_batch, 1)


# ---------------------------------------------------------------- 5. a sample from tar to loss: entry points


def preprocess_entry(shard_dir: Path, out_dir: Path) -> tuple[Callable[[], Any], Any]:
    """The Ray task's body on the one shard (pipeline.preprocess.shard.preprocess_shard), and its config."""
    from pipeline.config import PreprocessConfig
    from pipeline.preprocess.shard import preprocess_shard
    from pipeline.preprocess.sources import list_shards

    listing = list_shards(str(shard_dir))
    config = PreprocessConfig(image_size=16, patch_size=4)
    local, shard = pafs.LocalFileSystem(), listing.shards[0]
    return lambda: preprocess_shard(listing.filesystem, local, str(out_dir), config, None, shard), config


def feed_entry(patch_file: str, samples: int, geometry: Any, micro: int) -> Callable[[], Any]:
    """A one-rank pretraining feed's first micro-batch of the patch file (pipeline.pretrain.feed.Feed)."""
    from pipeline.pretrain.feed import Feed

    where = ("pipeline.pretrain.feed_plan", "pipeline.pretrain.order")
    files, counts = (patch_file,), (samples,)
    corpus = call_with(project_function(where, "Corpus"), files=files, counts=counts, geometry=geometry)
    plan = call_with(
        project_function(where, "FeedPlan"),
        corpus=corpus,
        seed=0,
        window=samples,
        steps_per_epoch=samples // micro,
        global_batch=micro,
        micro_batch=micro,
        batch=batch_split(micro, micro),
        threads=1,
        depth=1,
    )

    def first_micro_batch() -> Any:
        """The feed made, its first batch of epoch 0 read, its reader threads let go."""
        feed = Feed(plan, 0, 1, 0, [(0, 1)], False)
        try:
            return next(iter(feed.batches(0, 0)))
        finally:
            feed.close()

    return first_micro_batch


def loss_entry(patches: Any, labels: Any, num_classes: int) -> Callable[[], Any]:
    """The training objective's loss on the micro-batch (vit.objective.training_loss) with a tiny ViT."""
    from vit.config import ViTConfig
    from vit.recipe import Optimizer, Recipe, Schedule

    build_model = project_function(("vit.build", "vit.models"), "build_model")
    training_loss = project_function(("vit.objective", "vit.step"), "training_loss")
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        channels=3,
        num_classes=num_classes,
        width=32,
        depth=1,
        heads=2,
        mlp_dim=64,
    )
    model = build_model(config)
    n = len(labels)
    earlier = {"micro_batch_size": n}  # Recipe's parameter before BatchSplit (31aa73b)
    recipe = call_with(
        Recipe,
        optimizer=Optimizer(),
        schedule=Schedule(warmup_steps=0),
        total_steps=1,
        batch=batch_split(n, n),
        **earlier,
    )
    rng = np.random.default_rng(0)
    return lambda: training_loss(model, patches, labels, recipe, rng)


# ---------------------------------------------------------------- 5. recording


@contextlib.contextmanager
def recording(root: Path, on_call: Callable[[str, Any], None]) -> Iterator[None]:
    """Call `on_call(relative path, frame)` for every call of a function of a project file under `root`,
    in this thread and threads started meanwhile, except while a module is being imported."""
    prefixes = tuple(f"{(root / package).resolve()}{os.sep}" for package in PACKAGES)
    active = [True]
    resolved: dict[str, str | None] = {}

    def trace(frame: Any, event: str, arg: Any) -> None:
        """The global trace function: `on_call` for a project function's call; no line tracing."""
        if event != "call" or not active[0]:
            return
        filename = frame.f_code.co_filename
        if filename not in resolved:
            path = str(Path(filename).resolve())
            resolved[filename] = path[len(str(root.resolve())) + 1 :] if path.startswith(prefixes) else None
        if resolved[filename] is not None and not _importing(frame):
            on_call(resolved[filename], frame)

    threading.settrace(trace)
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
        active[0] = False


def _importing(frame: Any) -> bool:
    """Whether `frame` runs under an import: below a frame of Python's import machinery (importlib)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def write_tiny_shard(folder: Path, count: int = 8, classes: int = 3, size: int = 16) -> Path:
    """A WebDataset tar of `count` random PNGs labelled in `.cls` members, written with tarfile and Pillow."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with tarfile.open(folder / "part-000000.tar", "w") as tar:
        for index in range(count):
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image, "PNG")
            members = {f"s{index:03d}.png": image.getvalue(), f"s{index:03d}.cls": b"%d" % (index % classes)}
            for member, payload in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder


def tar_to_loss(root: Path) -> dict[str, Any]:
    """The project files a sample crosses from a tar to the loss, recorded while the three calls run."""
    files: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="house-sample-") as tmp:
        shards, patches = write_tiny_shard(Path(tmp) / "shards"), Path(tmp) / "patches"
        preprocess, config = preprocess_entry(shards, patches)
        with recording(root, lambda path, _: files.add(path)):
            report = preprocess()
        read = feed_entry(str(patches / report.file), report.samples, config.geometry(), micro=4)
        with recording(root, lambda path, _: files.add(path)):
            batch_patches, labels = read()
        loss = loss_entry(batch_patches, labels, num_classes=3)
        with recording(root, lambda path, _: files.add(path)):
            value = float(loss().loss.detach())
    return {"count": len(files), "files": sorted(files), "loss": value, "samples": report.samples}


# ---------------------------------------------------------------- 6. the learning rate: entry points

LR_JOB = f"""\
name: house-lr
datasets:
  corpus: {{kind: fractals, classes: 3, per_class: 4, size: 16}}
preprocess:
  corpus: {{image_size: 16}}
pretrain:
  data: corpus
  model: {{patch_size: 4, width: 32, depth: 1, heads: 2, mlp_dim: 64}}
  num_workers: 1
  global_batch_size: 4
  micro_batch_size: 4
  steps: 2
  zero_stage: 2
  optimizer: {{name: adamw, lr: {SENTINEL_LR}, weight_decay: 0.05}}
  schedule: {{warmup_steps: 0, decay: cosine}}
"""


def load_job_entry(path: Path) -> Any:
    """The job, as every command loads it (pipeline.config.load_config)."""
    from pipeline.config import load_config

    return load_config(path)


def worker_settings_entry(job: Any, patch_dir: str, run_dir: str) -> Any:
    """The pretraining plan and what every Ray Train worker is handed (pipeline.pretrain.plan)."""
    from pipeline.pretrain.plan import check_pretrain, worker_settings

    plan = call_with(check_pretrain, config=job.pretrain, directory=patch_dir, run_dir=run_dir)
    return call_with(worker_settings, config=job.pretrain, plan=plan, run_dir=run_dir, control=None)


def worker_optimizer_entry(settings: Any) -> Any:
    """What a Ray Train worker does with the settings' recipe to build its optimizer, on one CPU rank
    (pipeline.pretrain.worker: train_loop and _engine); the job's one worker makes the recipe's batch split
    already the rank's own."""
    from vit.engine import build_engine

    use_bf16 = project_function(("vit.objective", "vit.step"), "use_bf16")
    build_model = project_function(("vit.build", "vit.models"), "build_model")
    device = torch.device("cpu")
    plan = getattr(settings, "plan", settings)  # the settings hold the plan (earlier: its fields)
    recipe = dataclasses.replace(plan.recipe, bf16=use_bf16(plan.bf16, device))
    model = build_model(plan.architecture, device=device)
    return build_engine(model, recipe, plan.zero, 1, compile_model=False).optimizer


# ---------------------------------------------------------------- 6. recording


def holds(value: Any, wanted: float, depth: int = 3, seen: set[int] | None = None) -> bool:
    """Whether `value` is `wanted`, or one of its dataclass fields, pydantic fields or dict values is, down
    to `depth`."""
    if isinstance(value, float):
        return value == wanted
    seen = set() if seen is None else seen
    if depth == 0 or id(value) in seen:
        return False
    seen.add(id(value))
    return any(holds(child, wanted, depth - 1, seen) for child in _children(value))


def _children(value: Any) -> list[Any]:
    """The values one level inside `value` that `holds` looks into (its dict values, its fields)."""
    if isinstance(value, dict):
        return list(value.values())[:256]
    if isinstance(value, type):
        return []
    if dataclasses.is_dataclass(value):
        return [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    fields = getattr(type(value), "model_fields", None)
    if isinstance(fields, dict):
        return [getattr(value, "__dict__", {}).get(name) for name in fields]
    return []


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A one-process gloo group with the variables Ray Train sets, for a DeepSpeed engine in this process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    variables = {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


def lr_files(root: Path) -> dict[str, Any]:
    """The project files holding a function called with the job's lr (in its arguments, depth <= 3) on the
    way from the YAML to the worker's optimizer."""
    files: set[str] = set()

    def on_call(path: str, frame: Any) -> None:
        """Count the file when the call's arguments hold the lr."""
        if path not in files and any(holds(value, SENTINEL_LR) for value in frame.f_locals.values()):
            files.add(path)

    with tempfile.TemporaryDirectory(prefix="house-lr-") as tmp:
        patch_dir = _patch_folder(Path(tmp))
        job_file = Path(tmp) / "job.yaml"
        job_file.write_text(LR_JOB)
        with one_rank_group(), recording(root, on_call):
            settings = worker_settings_entry(load_job_entry(job_file), patch_dir, str(Path(tmp) / "run"))
            optimizer = worker_optimizer_entry(settings)
    arrived = all(group["lr"] == SENTINEL_LR for group in optimizer.param_groups)
    worker = root / "pipeline" / "pretrain" / "worker.py"
    by_source = worker.exists() and re.search(r"settings\.(plan\.)?recipe\b", worker.read_text()) is not None
    if by_source:
        files.add("pipeline/pretrain/worker.py")
    return {"count": len(files), "files": sorted(files), "arrived": arrived, "worker_by_source": by_source}


def _patch_folder(folder: Path) -> str:
    """A preprocessed folder (one patch file and its manifest) made without Ray and without recording."""
    from pipeline.preprocess.manifest import build_manifest, write_manifest

    out = folder / "patches"
    preprocess, config = preprocess_entry(write_tiny_shard(folder / "shards"), out)
    report = preprocess()
    write_manifest(pafs.LocalFileSystem(), str(out), build_manifest(config, str(folder), None, [report]))
    return str(out)


# ---------------------------------------------------------------- measuring a tree


def attempt(measure: Callable[[Path], dict[str, Any]], root: Path) -> dict[str, Any]:
    """A dynamic measurement, or {"error": why} when it cannot run on this tree."""
    try:
        return measure(root)
    except Exception as error:
        return {"count": None, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}


def measure(root: Path) -> dict[str, Any]:
    """Every number of the tree at `root`, whose pipeline/ and vit/ this process must import (the dynamic
    numbers are n/a when a module came from elsewhere)."""
    numbers = static_metrics(root)
    dynamic = {"tar_to_loss": attempt(tar_to_loss, root), "lr": attempt(lr_files, root)}
    strays = stray_modules(root)
    if strays:
        why = {"count": None, "error": f"imported from outside {root}: {', '.join(strays[:3])}"}
        dynamic = dict.fromkeys(dynamic, why)
    return {**numbers, **dynamic}


def stray_modules(root: Path) -> list[str]:
    """Project modules this process imported from a file outside `root`."""
    inside = root.resolve()
    files = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}
    return sorted(
        name
        for name, file in files.items()
        if is_project(name) and file and not Path(file).resolve().is_relative_to(inside)
    )


def import_only_from_path() -> None:
    """Drop the editable install's finder (it maps `vit`/`pipeline` to this checkout), so that a subprocess
    measuring another tree imports only that tree's modules, from PYTHONPATH: a module the tree lacks is
    missing, not found in this checkout."""
    sys.meta_path[:] = [
        f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
    ]


def git(*args: str) -> str:
    """A git command's output in this checkout."""
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def measure_revision(revision: str) -> dict[str, Any]:
    """The numbers of `revision`'s tree, measured by this script in a subprocess that imports that tree."""
    commit = git("rev-parse", "--short", revision)
    with tempfile.TemporaryDirectory(prefix="house-tree-") as tree, tempfile.TemporaryDirectory() as out:
        archive = subprocess.Popen(["git", "archive", commit], cwd=REPO, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", tree], stdin=archive.stdout, check=True)
        archive.wait()
        result = Path(out) / "house.json"
        env = {**os.environ, "PYTHONPATH": tree}
        done = subprocess.run(
            [sys.executable, __file__, "--root", tree, "--numbers-to", str(result)],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"measuring {revision} failed: {done.stderr[-2000:]}")
        return {"revision": revision, "commit": commit, **json.loads(result.read_text())}


# ---------------------------------------------------------------- the table


def summary_row(numbers: dict[str, Any]) -> dict[str, str]:
    """The numbers of one tree, each as the table shows it."""
    size, imports, heavy = numbers["size"], numbers["function_imports"], numbers["heavy_list"]

    def dynamic(key: str) -> str:
        """A measured count, or n/a and why."""
        entry = numbers[key]
        return str(entry["count"]) if entry.get("count") is not None else f"n/a ({entry.get('error')})"

    return {
        "modules": str(size["modules"]),
        "lines": str(size["lines"]),
        "largest module": f"{size['largest']['path']} ({size['largest']['lines']})",
        "modules over 600 lines": str(len(size["over_600"])),
        "function-level imports": str(imports["count"]),
        "  heavy": str(len(imports["heavy"])),
        "  light": str(len(imports["light"])),
        "  heavy list from": f"{heavy['source']} ({len(heavy['modules'])})",
        "import cycles": str(len(numbers["cycles"])),
        "back-up arrows": str(sum(not a["type_only"] for a in numbers["backup_arrows"])),
        "  type-only (annotations)": str(sum(a["type_only"] for a in numbers["backup_arrows"])),
        "files: tar -> loss": dynamic("tar_to_loss"),
        "files: lr YAML -> optimizer": dynamic("lr"),
    }


def table(columns: dict[str, dict[str, Any]]) -> str:
    """The trees' numbers side by side, with the targets."""
    rows = {name: summary_row(numbers) for name, numbers in columns.items()}
    labels = list(next(iter(rows.values())))
    widths = [max(len(label) for label in labels)]
    widths += [max(len(name), *(len(row[label]) for label in labels)) for name, row in rows.items()]
    header = ["", *rows, "target"]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, [*widths, 6], strict=True))]
    for label in labels:
        cells = [label, *(row[label] for row in rows.values()), TARGETS.get(label, "")]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, [*widths, 6], strict=True)).rstrip())
    return "\n".join(lines)


def details(name: str, numbers: dict[str, Any]) -> str:
    """The lists behind one tree's numbers."""
    lines = [f"\n== {name}"]
    if numbers["heavy_list"]["why"]:
        lines.append(f"  heavy list: DESIGN's, as {numbers['heavy_list']['why']}")
    lines += [f"  over 600 lines: {m['path']} ({m['lines']})" for m in numbers["size"]["over_600"]]
    lines += [f"  light import: {i['at']}  {i['import']}" for i in numbers["function_imports"]["light"]]
    for cycle in numbers["cycles"]:
        lines.append(f"  cycle: {' <-> '.join(cycle['modules'])}")
        lines += [f"    {edge}" for edge in cycle["imports"]]
    lines += [f"  back-up arrow: {a['at']}  {a['arrow']}  [{a['why']}]" for a in numbers["backup_arrows"]]
    for key, title in (("tar_to_loss", "tar -> loss"), ("lr", "lr YAML -> optimizer")):
        entry = numbers[key]
        lines += [f"  {title}: {path}" for path in entry.get("files", [])]
        if entry.get("worker_by_source"):
            lines.append(
                "    (pipeline/pretrain/worker.py by its source: it hands the settings' recipe to vit)"
            )
        if entry.get("arrived") is False:
            lines.append("    (the optimizer's lr is not the job's: the path was not followed to the end)")
    return "\n".join(lines)


def house_numbers(revision: str | None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """This working tree's numbers, and `revision`'s beside them when asked: the table's columns and the
    results JSON."""
    dirty = bool(git("status", "--porcelain", "--", *PACKAGES))
    here = {"commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty, **measure(REPO)}
    columns = {f"here ({here['commit']}{'+changes' if dirty else ''})": here}
    results: dict[str, Any] = {
        "what": "the house in numbers (how each is measured: benchmarks/house.py's docstring)",
        "commit": here["commit"],
        "dirty": dirty,
        "targets": {label.strip(): target for label, target in TARGETS.items()},
        "here": here,
    }
    if revision:
        try:
            other = measure_revision(revision)
        except (RuntimeError, subprocess.SubprocessError) as error:
            sys.exit(f"--at {revision}: {error}")
        columns[f"at {revision}"] = results["at"] = other
    return columns, results


def main(argv: list[str] | None = None) -> None:
    """Print the table and the lists behind it, and write results/house.json; or, as the subprocess of
    `--at`, write one tree's numbers where asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", metavar="REV", help="also measure this git revision, side by side")
    parser.add_argument("--root", type=Path, default=REPO, help=argparse.SUPPRESS)
    parser.add_argument("--numbers-to", type=Path, help=argparse.SUPPRESS)  # a subprocess's answer
    args = parser.parse_args(argv)
    if args.numbers_to is not None:
        import_only_from_path()
        args.numbers_to.write_text(json.dumps(measure(args.root)))
        return
    columns, results = house_numbers(args.at)
    print(table(columns))
    for name, numbers in columns.items():
        print(details(name, numbers))
    if str(REPO) not in sys.path:  # run as a script: benchmarks.machine is found from the checkout
        sys.path.append(str(REPO))
    from benchmarks.machine import save  # it imports pipeline.info: never in the subprocess of --at

    print(f"\nwritten: {save('house', results)}")


if __name__ == "__main__":
    main()
