"""The code's shape: packages depend one way (docs/design.md), no module cycle inside a package, no private
names cross modules (tests included), every config key is declared with a meaning, and no ds_configs
template holds a value the plan sets."""
import ast
import json
from pathlib import Path

import pytest

from conftest import REPO
from trainer.config import KEYS, RUNTIME_KEYS

TRAINER = REPO / "trainer"
# docs/design.md: what each package may import. "root" is trainer/*.py (the errors, the CLI contract, the
# config, the launcher's environment, files and units); prepare/ is never imported by a training run.
MAY_IMPORT = {
    "root": "root",
    "data": "root",
    "prepare": "root data",
    "model": "root data",
    "optim": "root",
    "plan": "root data model optim",
    "run": "root data model optim plan",
    "tools": "root data model optim plan run prepare",
}


def package_of(module):
    """'trainer.run.loop' -> 'run'; 'trainer.cli' -> 'root'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "root"


def trainer_imports(path):
    """[(module imported, names imported)] anywhere in the file (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trainer":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from trainer.run import checkpoint` imports a module; `from trainer.cli import run_main` a name
                is_module = (TRAINER.parent / (sub.replace(".", "/") + ".py")).is_file()
                found.append((sub, []) if is_module else (node.module, [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "trainer"]
    return found


def modules():
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in TRAINER.rglob("*.py")
            if p.name != "__init__.py"}


def sources():
    files = sorted(TRAINER.rglob("*.py")) + sorted((REPO / "launch").glob("*.py"))
    files += sorted((REPO / "bench").glob("*.py"))
    files += sorted((REPO / "data").rglob("*.py")) + sorted((REPO / "tests").glob("*.py"))
    return [f for f in files if f.name != "__init__.py"]


def test_every_package_has_a_rule():
    packages = {p.name for p in TRAINER.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages | {"root"} == set(MAY_IMPORT), "add the package to MAY_IMPORT here and to docs/design.md"


@pytest.mark.parametrize("module", sorted(modules()))
def test_packages_import_one_way(module):
    own = package_of(module)
    allowed = MAY_IMPORT[own].split() + [own]
    for imported, _ in trainer_imports(modules()[module]):
        assert package_of(imported) in allowed, f"{module} ({own}) imports {imported} ({package_of(imported)})"


def test_no_import_cycle_inside_a_package():
    graph = {m: {i for i, _ in trainer_imports(p) if i in modules() and i != m} for m, p in modules().items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if m in done:
            return
        path.append(m)
        for n in graph[m]:
            visit(n)
        path.pop()
        done.add(m)

    for m in graph:
        visit(m)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_name_crosses_a_module(path):
    own = ".".join(path.relative_to(REPO).with_suffix("").parts)
    for module, names in trainer_imports(path):
        private = [n for n in names if n.startswith("_")]
        assert not private or module == own, f"{path.name} imports private names {private} from {module}"
    nodes = list(ast.walk(ast.parse(path.read_text())))
    imported = {alias.asname or alias.name for node in nodes if isinstance(node, ast.ImportFrom)
                and node.module and node.module.split(".")[0] == "trainer" for alias in node.names}
    reached = [f"{node.value.id}.{node.attr}" for node in nodes
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
               and node.value.id in imported and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not reached, f"{path.name} reaches private names of other modules: {reached}"


def test_training_never_imports_preparation():
    """A training run imports trainer/run/ and what it needs; trainer/prepare/ only prepares data."""
    for module, path in modules().items():
        if package_of(module) in ("run", "plan", "model", "data", "optim"):
            assert not any(package_of(i) == "prepare" for i, _ in trainer_imports(path)), module


def test_every_key_is_declared_with_a_meaning_and_a_range():
    for name, key in KEYS.items():
        assert key.meaning and key.group, name
        if isinstance(key.default, (int, float)) and not isinstance(key.default, bool):
            assert key.valid is not None and key.must, f"{name}: numbers need a valid range"
            assert key.valid(key.default), f"{name}: the default must be valid"
    assert not set(RUNTIME_KEYS) & set(KEYS)


PLAN_SET = {"reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
            "stage3_param_persistence_threshold", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "train_batch_size", "bf16", "fp16", "optimizer", "gradient_clipping"}


@pytest.mark.parametrize("template", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_templates_hold_no_value_the_plan_sets(template):
    config = json.loads(template.read_text())
    keys = set(config) | set(config.get("zero_optimization", {}))
    assert not keys & PLAN_SET, f"{template.name} sets {keys & PLAN_SET}, which the plan overwrites"


def test_the_package_map_is_documented():
    design = (REPO / "docs" / "design.md").read_text()
    for package in MAY_IMPORT:
        if package != "root":
            assert f"`{package}/`" in design, f"docs/design.md does not describe trainer/{package}/"
    assert Path(TRAINER / "__init__.py").read_text().strip(), "trainer/__init__.py says what each package is"
