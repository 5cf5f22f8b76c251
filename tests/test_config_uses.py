"""Every use of the config in trainer/, launch/ and bench/ names a key that exists, found without running
anything: a misspelt `cfg.learnig_rate` fails here, not an hour into a run.

The config object is named `cfg`, `<something>_cfg` or `<object>.cfg` (run.cfg, start.cfg); on it the test
checks attribute reads and writes, getattr/setattr with a name, dataclasses.replace(cfg, key=...),
Config(key=...), and a key read through a loop over a module constant (`for key in PLAN_KEYS: getattr(cfg, key)`);
`cfg[...]` is refused (a Config is no mapping).
"""
import ast
import dataclasses
from pathlib import Path

import pytest

from trainer.config import FIELDS, Config

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("trainer", "launch", "bench")
# What a config offers besides its keys: its public methods
# A computed name whose keys come from elsewhere (a checked caller) says so on its line
COMPUTED = "# computed keys:"
METHODS = {name for name, value in vars(Config).items() if callable(value) and not name.startswith("_")}


def is_config(node):
    """The naming rule the check relies on: cfg, x_cfg, obj.cfg, obj.x_cfg."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    return name is not None and (name == "cfg" or name.endswith("_cfg"))


def literal_strings(node):
    """['a', 'b'] for a literal tuple or list of strings, else None."""
    if isinstance(node, (ast.Tuple, ast.List)) and node.elts and \
            all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return [e.value for e in node.elts]
    return None


def string_constants(tree, follow_imports=True):
    """Module-level NAME = ('a', 'b', ...), defined here or imported from trainer/ (read from its source, not
    imported): the tuples of key names a loop may read the config with."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and literal_strings(node.value):
            found.update({t.id: literal_strings(node.value) for t in node.targets if isinstance(t, ast.Name)})
        elif follow_imports and isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainer"):
            path = REPO / (node.module.replace(".", "/") + ".py")
            theirs = string_constants(ast.parse(path.read_text()), False) if path.is_file() else {}
            found.update({a.asname or a.name: theirs[a.name] for a in node.names if a.name in theirs})
    return found


def bindings(loop, constants):
    """(variable, the key names it takes, or None where unknown) of one for loop or comprehension:
    `for key in CONSTANT`, `for key in ('a', 'b')`, or `for key, label in (('a', 'A'), ...)`."""
    target, source = loop.target, loop.iter
    if isinstance(target, ast.Name):
        return [(target.id, constants.get(source.id) if isinstance(source, ast.Name) else literal_strings(source))]
    if not isinstance(target, ast.Tuple):
        return []
    rows = [literal_strings(row) for row in source.elts] if isinstance(source, (ast.Tuple, ast.List)) else [None]
    known = all(row and len(row) == len(target.elts) for row in rows)
    return [(part.id, [row[i] for row in rows] if known else None)
            for i, part in enumerate(target.elts) if isinstance(part, ast.Name)]


def scoped_nodes(tree, constants):
    """Every node with the loop variables in scope where it stands (innermost last)."""
    def visit(node, scope):
        yield node, scope
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            inner = scope + [b for g in node.generators for b in bindings(g, constants)]
            for child in ast.iter_child_nodes(node):
                yield from visit(child, inner)
        elif isinstance(node, ast.For):
            yield from visit(node.iter, scope)
            inner = scope + bindings(node, constants)
            for child in node.body + node.orelse:
                yield from visit(child, inner)
        else:
            fresh = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                yield from visit(child, [] if fresh else scope)
    return visit(tree, [])


def unknown_uses(source, path="<text>"):
    """'path:line: what' for each use of a name the config does not have."""
    tree = ast.parse(source)
    constants = string_constants(tree)
    lines = source.splitlines()
    problems = []

    def bad(node, what):
        problems.append(f"{path}:{node.lineno}: {what}")

    def check_name(node, name, how):
        if name not in FIELDS:
            bad(node, f"{how} '{name}' is not a config key")

    def check_dynamic(node, name_node, how, scope):
        if isinstance(name_node, ast.Constant):
            check_name(node, name_node.value, how)
            return
        bound = [names for var, names in scope if isinstance(name_node, ast.Name) and var == name_node.id]
        known = bound[-1] if bound else None
        if known is None and COMPUTED not in lines[node.lineno - 1]:
            bad(node, f"{how} with a computed name {ast.unparse(name_node)!r}: iterate a module constant of key "
                      f"names, or say where the names come from in a '{COMPUTED} ...' comment")
        for name in known or ():
            check_name(node, name, how)

    for node, scope in scoped_nodes(tree, constants):
        if isinstance(node, ast.Attribute) and is_config(node.value):
            if node.attr not in FIELDS and node.attr not in METHODS:
                bad(node, f"cfg.{node.attr} is not a config key")
        elif isinstance(node, ast.Subscript) and is_config(node.value):
            bad(node, f"{ast.unparse(node)}: the config is read by attribute (cfg.key, getattr(cfg, name))")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func in ("getattr", "setattr", "hasattr") and len(node.args) >= 2 and is_config(node.args[0]):
                check_dynamic(node, node.args[1], f"{func}(cfg, ...)", scope)
            elif func in ("replace", "dataclasses.replace") and node.args and is_config(node.args[0]) \
                    or func in ("Config", "Config.saved"):
                for keyword in node.keywords:
                    if keyword.arg is not None:
                        check_name(node, keyword.arg, f"{func}(..., {keyword.arg}=)")
    return problems


def checked_files():
    return sorted(p for root in CHECKED for p in (REPO / root).rglob("*.py"))


def test_every_config_use_names_a_key():
    problems = [p for path in checked_files()
                for p in unknown_uses(path.read_text(), path.relative_to(REPO))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("snippet, found", [
    ("def f(cfg):\n    return cfg.learnig_rate\n", "cfg.learnig_rate is not a config key"),
    ("def f(run):\n    run.cfg.mdoe = 'full'\n", "cfg.mdoe is not a config key"),
    ("def f(saved_cfg):\n    return saved_cfg['n_layer']\n", "the config is read by attribute"),
    ("def f(cfg):\n    return getattr(cfg, 'lora_rr')\n", "'lora_rr' is not a config key"),
    ("def f(cfg):\n    return replace(cfg, max_iter=3)\n", "'max_iter' is not a config key"),
    ("Config(batchsize=3)\n", "'batchsize' is not a config key"),
    ("KEYS = ('mode', 'zero_stag')\ndef f(cfg):\n    return {k: getattr(cfg, k) for k in KEYS}\n",
     "'zero_stag' is not a config key"),
    ("def f(cfg, k):\n    return getattr(cfg, k)\n", "computed name 'k'"),
    ("def f(cfg):\n    return [getattr(cfg, k) for k, _ in (('use_dora', 'DoRA'), ('use_rslor', 'rsLoRA'))]\n",
     "'use_rslor' is not a config key"),
    ("from trainer.run.resume import RUN_MODEL_KEYS\n"
     "def f(cfg):\n    return [getattr(cfg, k) for k in RUN_MODEL_KEYS], cfg.n_layr\n",
     "cfg.n_layr is not a config key"),
])
def test_a_misspelt_key_is_found(snippet, found):
    problems = unknown_uses(snippet)
    assert len(problems) == 1 and found in problems[0], problems


def test_the_right_names_pass():
    snippet = ("KEYS = ('mode', 'zero_stage')\n"
               "def f(cfg, run, saved):\n"
               "    for key in saved:\n"
               "        cfg.mode = getattr(cfg, key)  # computed keys: the caller's, checked there\n"
               "    run.cfg.max_iters = cfg.learning_rate\n"
               "    cfg = replace(cfg, mode='lora', **{'dropout': 0.0})\n"
               "    return cfg.to_dict(), [getattr(cfg, k) for k in KEYS], Config(n_layer=2)\n")
    assert unknown_uses(snippet) == []
    assert {"learning_rate", "mode", "continued_from"} <= FIELDS == {f.name for f in dataclasses.fields(Config)}
