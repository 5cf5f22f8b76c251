"""A run's folder (out_dir): the one place that knows the files a run writes beside its checkpoints.

  config.json        the resolved config the run trains with
  model_config.json  the GPT-2 architecture (transformers' GPT2Config), to rebuild the model
  plan.json          the plan (trainer/plan/report.plan_to_dict), with its step-down history
  meta.json          the dataset's meta: tokenizer and vocabulary (runs before it have meta.pkl)
  checkpoints/       DeepSpeed checkpoints (trainer/run/checkpoint.py)
Training writes them (rank 0, atomically); resume, sampling, evaluation and export read them here, and a file
that is cut short or is not what it should be is one line naming it (no file here is unpickled: an older
run's meta.pkl goes through trainer/data/meta.py's data-only unpickler).
"""
import json
from pathlib import Path

from trainer.config import Config
from trainer.data.meta import read_meta_file, write_meta_json
from trainer.errors import UserError
from trainer.files import atomic_write
from trainer.model.model_files import RUN_FILE_FIX
from trainer.os_errors import is_refusal

CONFIG, MODEL_CONFIG, PLAN = "config.json", "model_config.json", "plan.json"


def damaged_run_file(path):
    return f"{path} is damaged (cut short or not what the trainer wrote); {RUN_FILE_FIX}"


def read_json(path, kind=dict):
    """A run file's JSON object, or one line naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(damaged_run_file(path)) from None
    except OSError as exc:
        if is_refusal(exc):
            raise
        raise UserError(damaged_run_file(path)) from None
    if not isinstance(value, kind):
        raise UserError(damaged_run_file(path))
    return value


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    def __str__(self):
        return str(self.path)

    @property
    def model_config_path(self):
        return self.path / MODEL_CONFIG

    def is_run(self):
        """A training run's folder: its config and architecture are there."""
        return (self.path / CONFIG).is_file() and self.model_config_path.is_file()

    def config(self):
        """config.json as a Config: a key the run's version of the trainer did not have yet reads as its
        default, one this version no longer has is left out."""
        return Config.saved(read_json(self.path / CONFIG))

    def plan(self):
        """plan.json, or None for a run that has none."""
        path = self.path / PLAN
        return read_json(path) if path.is_file() else None

    def mode(self):
        """The mode the run trained in: its plan's (config.json may say 'auto')."""
        plan = self.plan()
        return plan["mode"] if plan else self.config().mode

    def dtype(self):
        plan = self.plan()
        return plan.get("dtype", "fp32") if plan else "fp32"

    def meta(self):
        return read_meta_file(self.path, RUN_FILE_FIX)

    def write(self, cfg, model_config, plan, meta):
        """The run's files, at its start (after a resume too: the config may have changed)."""
        atomic_write(self.path / CONFIG, json.dumps(cfg.to_dict(), indent=2))
        atomic_write(self.model_config_path, model_config.to_json_string())
        self.write_plan(plan)
        write_meta_json(self.path, meta)

    def write_plan(self, plan):
        atomic_write(self.path / PLAN, json.dumps(plan, indent=2))
