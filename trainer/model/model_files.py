"""A Hugging Face model folder's files checked before transformers reads them, so that one cut short or
damaged is one line naming it (transformers would end in a SafetensorError or JSONDecodeError traceback):
every JSON file (config.json, generation_config.json, the tokenizer's files, a sharded model's index) parses,
every .safetensors file's header parses and covers the file exactly (safetensors' own check, no tensor read),
and the BPE merges are text."""
import json
from pathlib import Path

from trainer.errors import UserError
from trainer.os_errors import is_refusal

MODEL_FILE_FIX = "save the model again with save_pretrained (or copy it again from its source)"
# A training run's own file (trainer/run/run_dir.py) that cannot be read: nothing the trainer does rebuilds it
RUN_FILE_FIX = "restore it from a copy of the run, or train the run again into a new --out_dir"


def problem_with(path):
    """What is wrong with one file of a model folder, or None."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                f.keys()
        elif path.suffix in (".txt", ".bpe"):
            path.read_text(encoding="utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        return f"not valid {path.suffix[1:]}: {str(exc).splitlines()[0]}" if str(exc) else "not valid JSON"
    except Exception as exc:  # safetensors' SafetensorError, or an unreadable file
        if is_refusal(exc):  # the OS's own line (trainer/cli.run_main)
            raise
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
    return None


def check_file(path, fix):
    problem = problem_with(Path(path))
    if problem:
        raise UserError(f"{path} is damaged ({problem}); {fix}")


def check_model_files(folder):
    """Every file of the folder transformers may read, checked (see the module docstring)."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            check_file(path, MODEL_FILE_FIX)
