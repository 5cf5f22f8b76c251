"""Docs that cannot go stale: every code path the docs name exists (a module, the function or class named in
it, a test function), every line docs/troubleshooting.md quotes is one the code prints, and the README stays
a first page (docs/commands.md holds the commands)."""
import ast
import errno
import functools
import json
import os
import re
from pathlib import Path

import pytest

from conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
TESTS = REPO / "tests"
# Files the docs name that this repository does not hold, each for a reason given beside it.
NOT_HERE = {
    "data/openwebtext/prepare.py": "nanoGPT's script, whose output folder is read as it is (docs/data.md)",
}
# A path with a top-level folder of the repository (not a flag's value: --out=bench/X.md is the user's); `.name`, `:name` or `::name` after a module names
# something in it (trainer/plan/memory.optimizer_path, trainer/run/resume.py:resume_layout, tests/x.py::test_y).
PATH = re.compile(r"(?<![\w./=-])((?:trainer|bench|tests|launch|data)(?:/[\w-]+)+(?:\.(?:py|sh|md|json|txt))?)"
                  r"((?:::|:|\.)[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?")
# In backticks, a path inside trainer/ as design.md writes it (`run/ranks.py`, `plan/memory.optimizer_path`).
PACKAGE_PATH = re.compile(r"`((?:run|plan|model|optim|tools|prepare)(?:/[\w-]+)+(?:\.py)?)"
                          r"((?:\.|:)[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?")
# A test named in backticks without its folder: `test_x.py`, `test_x.py::test_y` or `test_y`.
TEST_NAME = re.compile(r"`(test_\w+\.py)(?:::(\w+))?`|`(test_\w+)`")


def doc_lines():
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            yield f"{doc.relative_to(REPO)}:{number}", line


@functools.cache
def names_in(path):
    """{name: the names inside it (a class's methods and fields)} for a Python module's top level."""
    names = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            names[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            names[node.name] |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update({t.id: set() for t in ast.walk(target) if isinstance(t, ast.Name)})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: set() for a in node.names})
    return names


def missing(path, attribute, roots=(REPO,)):
    """What is missing of `path` (a file, or a module without .py) and the name in it; None if both exist."""
    if path in NOT_HERE:
        return None
    for root in roots:
        for candidate in (root / path, root / f"{path}.py"):
            if candidate.is_file() or (candidate.is_dir() and not attribute):
                if not attribute or candidate.suffix != ".py":
                    return None
                first, *rest = attribute.lstrip(":.").split(".")
                inside = names_in(candidate)
                if first not in inside:
                    return f"{candidate.relative_to(REPO)} has no {first}"
                if rest and inside[first] and rest[0] not in inside[first]:
                    return f"{candidate.relative_to(REPO)}: {first} has no {rest[0]}"
                return None
    return f"{path} does not exist"


def is_a_test(name):
    return any(name in names_in(path) for path in TESTS.glob("*.py"))


def test_every_code_path_the_docs_name_exists():
    stale = []
    for where, line in doc_lines():
        for match in PATH.finditer(line):
            path, attribute = match.groups()
            if path.startswith("data/") and not path.endswith(".py"):
                continue  # data/x/val.bin, data/rows.jsonl: example datasets and inputs, not code
            if path.startswith("bench/") and path.endswith(".md") and not (REPO / path).exists():
                # a results table a GPU run writes: its script must name it
                if any(path in p.read_text() or path.split("/")[1] in p.read_text()
                       for p in (REPO / "bench").glob("*.py")):
                    continue
            problem = missing(path, attribute, (REPO, REPO / "trainer") if path.startswith("data/") else (REPO,))
            if problem:
                stale.append(f"{where}: {match.group(0)}: {problem}")
        for match in PACKAGE_PATH.finditer(line):
            problem = missing(*match.groups(), roots=(REPO / "trainer",))
            if problem:
                stale.append(f"{where}: {match.group(0)}`: {problem}")
        for match in TEST_NAME.finditer(line):
            file, name, bare = match.groups()
            if file and not (TESTS / file).is_file():
                stale.append(f"{where}: {file} is not in tests/")
            elif file and name and name not in names_in(TESTS / file):
                stale.append(f"{where}: tests/{file} has no {name}")
            elif bare and not is_a_test(bare):
                stale.append(f"{where}: no test is called {bare}")
    assert not stale, "\n".join(stale)


# ----------------------------------------------------------------------------- quoted messages

PREFIXES = ("error: ", "warning: ", "notice: ", "interrupted: ")
ELISION = re.compile(r"\.\.\.")  # what a quoted line leaves out; its brackets stay, as the code prints them
# an uncovered word that is no value: plain lowercase letters (values hold digits, paths, quotes, = or _)
PLAIN_WORD = re.compile(r"(?<![\w/.'=-])[a-z]{3,}(?![\w/.'=(-])")
GRAM = 8  # characters in common with a string that count as its text
SHORT = 6  # a literal part this long found whole counts wherever it is
ANCHOR = 12  # characters of a piece that tie it to one string of the code (then all its parts count)
# the example values of the quoted lines: what a placeholder printed there (a role, a field, a type, a mode)
VALUES = {"int", "char", "lora", "full", "human", "gpt", "answer", "question", "pid", "out", "bert"}


def docstrings(tree):
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def literal_parts(path):
    """[the literal parts of one string or f-string] for every string of a Python file, docstrings left out."""
    tree = ast.parse(path.read_text())
    skip = docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield [v.value for v in node.values if isinstance(v, ast.Constant)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield [node.value]


@functools.cache
def printed_text():
    """(the literal parts of every string the code a user runs prints, {GRAM characters: the indices of the
    strings holding them}). The OS's error texts (an OSError's strerror) and json's are printed too."""
    strings = []
    for folder in ("trainer", "launch", "data", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            strings += literal_parts(path)
    strings += [[os.strerror(code)] for code in errno.errorcode]
    strings += literal_parts(Path(json.decoder.__file__))
    grams = {}
    for i, parts in enumerate(strings):
        for part in parts:
            for at in range(len(part) - GRAM + 1):
                grams.setdefault(part[at:at + GRAM], set()).add(i)
    return strings, grams


@functools.cache
def whole_parts():
    return {part.strip() for parts in printed_text()[0] for part in parts}


def unprinted_words(message):
    """The plain words of a quoted message that no string of the code holds. Between elisions the quoted text
    is matched GRAM characters at a time against every string; a string that shares ANCHOR characters with it
    (in runs, or as its literal parts: ' has ' between two values) covers all its literal parts found there.
    What is left must be the values the code fills in: paths, numbers, quoted names, a word a value of the
    code (a whole literal) or VALUES."""
    strings, grams = printed_text()
    words = []
    for piece in ELISION.split(message):
        covered = [False] * len(piece)
        windows = {}  # string -> the starts of the GRAM-character windows of the piece it holds
        for at in range(len(piece) - GRAM + 1):
            for i in grams.get(piece[at:at + GRAM], ()):
                windows.setdefault(i, []).append(at)
        for i, parts in enumerate(strings):
            spans = [m.span() for part in parts if len(part.strip()) >= 2 and part in piece
                     for m in re.finditer(re.escape(part), piece)]
            for start, end in spans:
                if end - start >= SHORT:  # a literal part whole ('must be ', ' or more') is the code's text
                    covered[start:end] = [True] * (end - start)
            spans += [(at, at + GRAM) for at in windows.get(i, ())]
            chars = {c for start, end in spans for c in range(start, end)}
            if len(chars) >= min(ANCHOR, len(piece.strip())):
                for c in chars:
                    covered[c] = True
        words += [w.group() for w in PLAIN_WORD.finditer(piece) if not all(covered[w.start():w.end()])
                  and w.group() not in VALUES and w.group() not in whole_parts()]
    return words


def quoted_messages():
    text = (REPO / "docs/troubleshooting.md").read_text().replace("\\|", "|")
    return [m for m in re.findall(r"`([^`]+)`", text) if m.startswith(PREFIXES)]


def test_troubleshooting_quotes_only_lines_the_code_prints():
    messages = quoted_messages()
    assert len(messages) > 100  # the table is read (each row quotes at least one line)
    unprinted = {m: words for m in messages if (words := unprinted_words(m.split(": ", 1)[1]))}
    assert not unprinted, "\n".join(f"{m!r}: no code prints {' '.join(w)!r}" for m, w in unprinted.items())


def test_a_line_the_code_does_not_print_is_found():
    # the check itself: the stale line issue 26 found, a real line, and that line with one word changed
    assert unprinted_words("out-a has no checkpoint yet; train longer than one eval_interval or set "
                           "--always_save_checkpoint=True") == ["yet"]
    line = "--columns names the fields of instruction records; add --format=instructions (a text corpus names its " \
           "column with --text_field)"
    assert unprinted_words(line) == []
    assert unprinted_words(line.replace(" with ", " via ")) == ["via"]
    assert unprinted_words("wandb_log=True but the wandb package is not present; pip install wandb") == ["present"]


def test_design_md_lists_every_module_once():
    text = (REPO / "docs/design.md").read_text()
    section = text.split("## Every module, one line", 1)[1].split("\n## ", 1)[0]
    listed, folder = [], None
    for line in section.splitlines():
        if header := re.fullmatch(r"(?:root, )?`(trainer/(?:\w+/)?)`:", line):
            folder = header.group(1)
        elif item := re.match(r"- `(\w+\.py)`: \S", line):
            listed.append(folder + item.group(1))
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "trainer").rglob("*.py") if p.name != "__init__.py")
    assert sorted(listed) == modules, (f"not listed: {sorted(set(modules) - set(listed))}; "
                                       f"not modules: {sorted(set(listed) - set(modules))}")


# ----------------------------------------------------------------------------- the README and docs/commands.md

def test_readme_is_a_first_page():
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 120, f"README.md has {len(lines)} lines; move detail to docs/ (at most 120)"
    long = [f"README.md:{n}: {len(line)} characters" for n, line in enumerate(lines, 1) if len(line) > 120]
    assert not long, "\n".join(long)
    for promise in ("bash launch/quickstart.sh", "bash launch/test.sh", "(docs/commands.md)",
                    "one line `error: <what>; <the fix>`", "exits\nwith code **2**"):
        assert promise in text, f"README.md no longer says {promise!r}"


def entry_points():
    """Every command a user runs: launch/, data/**/prepare.py, and the benchmarks (a script with a main)."""
    scripts = sorted((REPO / "launch").glob("*.py")) + sorted((REPO / "launch").glob("*.sh"))
    scripts += sorted((REPO / "data").rglob("prepare.py"))
    scripts += [p for p in sorted((REPO / "bench").glob("*.py")) if "__main__" in p.read_text()]
    return [str(p.relative_to(REPO)) for p in scripts]


def flags_of(script):
    """The flags a script's --help lists."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, REPO / script, "--help"], capture_output=True, text=True, timeout=120,
                         cwd=REPO).stdout
    return set(re.findall(r"^\s+(--\w+)", out, flags=re.M)) - {"--help"}


def test_commands_md_names_every_entry_point_flag_and_key():
    from trainer.config import KEYS
    text = (REPO / "docs/commands.md").read_text()
    assert not [s for s in entry_points() if s not in text], "entry points missing from docs/commands.md"
    # a config key is listed by its name (train.py's --help lists it as --key)
    missing = {script: sorted(f for f in flags_of(script) if f"`{f}" not in text and f"`{f[2:]}`" not in text)
               for script in ("launch/train.py", "launch/sample.py", "launch/eval.py", "launch/merge_adapter.py",
                              "data/prepare.py", "data/shakespeare/prepare.py")}
    assert not any(missing.values()), f"flags missing from docs/commands.md: {missing}"
    assert not [k for k in KEYS if f"`{k}`" not in text], "config keys missing from docs/commands.md"
