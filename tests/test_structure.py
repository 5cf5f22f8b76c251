"""The code's shape: imports point one way (docs/design.md's layers), no private names cross modules,
every config key is declared with a meaning, and no ds_configs template holds a value the plan sets."""
import ast
import json

import pytest

from conftest import REPO
from trainer.config import KEYS, RUNTIME_KEYS

# docs/design.md: each module imports only from lower layers (a number lower than its own).
LAYERS = {
    "errors": 0,
    "config": 1, "memory_model": 1, "tokenizer": 1, "ranks": 1, "faults": 1, "interrupts": 1, "run_logger": 1,
    "sampling": 1, "cli": 1,
    "planner": 2, "model": 2, "data": 2, "checkpoint": 2, "textprep": 2,
    "mixing": 3, "engine": 3, "adapters": 3, "evaluate": 3, "instructions": 3,
    "build": 4, "inference": 4, "simulate": 4,
    "oom": 5, "export": 5,
    "loop": 6,
}
ENTRY_POINTS = 7  # launch/*.py, data/**/prepare.py, bench/*.py


def trainer_imports(path):
    """[(module imported from trainer, names imported)] anywhere in the file (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "trainer":
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer."):
            found.append((node.module.split(".")[1], [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], []) for a in node.names if a.name.startswith("trainer.")]
    return found


def sources():
    files = sorted((REPO / "trainer").glob("*.py")) + sorted((REPO / "launch").glob("*.py"))
    files += sorted((REPO / "data").rglob("*.py")) + sorted((REPO / "bench").glob("*.py"))
    return [f for f in files if f.name != "__init__.py"]


def test_every_trainer_module_has_a_layer():
    modules = {p.stem for p in (REPO / "trainer").glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), "add the module to LAYERS here and to docs/design.md"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down_and_use_public_names(path):
    own = LAYERS.get(path.stem, ENTRY_POINTS) if path.parent.name == "trainer" else ENTRY_POINTS
    for module, names in trainer_imports(path):
        assert LAYERS[module] < own, f"{path.name} (layer {own}) imports trainer.{module} (layer {LAYERS[module]})"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.name} imports private names {private} from trainer.{module}"
    nodes = list(ast.walk(ast.parse(path.read_text())))
    modules = {alias.asname or alias.name for node in nodes
               if isinstance(node, ast.ImportFrom) and node.module == "trainer" for alias in node.names}
    reached = [f"{node.value.id}.{node.attr}" for node in nodes
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
               and node.value.id in modules and node.attr.startswith("_")]
    assert not reached, f"{path.name} reaches private names of other modules: {reached}"


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
