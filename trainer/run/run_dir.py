"""A run's folder (out_dir): the one place that knows the files a run writes beside its checkpoints.

  config.json        the resolved config the run trains with
  model_config.json  the GPT-2 architecture (transformers' GPT2Config), to rebuild the model
  plan.json          the plan (trainer/plan/report.plan_to_dict), with its step-down history
  meta.pkl           the dataset's meta: tokenizer and vocabulary
  checkpoints/       DeepSpeed checkpoints (trainer/run/checkpoint.py)
Training writes them (rank 0, atomically); resume, sampling, evaluation and export read them here.
"""
import json
import pickle
from pathlib import Path

from trainer.config import Config
from trainer.files import atomic_write

CONFIG, MODEL_CONFIG, PLAN, META = "config.json", "model_config.json", "plan.json", "meta.pkl"


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
        return Config.saved(json.loads((self.path / CONFIG).read_text()))

    def plan(self):
        """plan.json, or None for a run that has none."""
        path = self.path / PLAN
        return json.loads(path.read_text()) if path.is_file() else None

    def mode(self):
        """The mode the run trained in: its plan's (config.json may say 'auto')."""
        plan = self.plan()
        return plan["mode"] if plan else self.config()["mode"]

    def dtype(self):
        plan = self.plan()
        return plan.get("dtype", "fp32") if plan else "fp32"

    def meta(self):
        with open(self.path / META, "rb") as f:
            return pickle.load(f)

    def write(self, cfg, model_config, plan, meta):
        """The run's files, at its start (after a resume too: the config may have changed)."""
        atomic_write(self.path / CONFIG, json.dumps(dict(cfg), indent=2))
        atomic_write(self.model_config_path, model_config.to_json_string())
        self.write_plan(plan)
        atomic_write(self.path / META, pickle.dumps(meta))

    def write_plan(self, plan):
        atomic_write(self.path / PLAN, json.dumps(plan, indent=2))
