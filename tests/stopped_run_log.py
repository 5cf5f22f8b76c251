"""Run launch/train.py's main in this process and, when the guard stops it, report on its TensorBoard log while
the error's traceback still holds the run (so that nothing is closed by the run's collection): whether the
writer was closed, and the eval/val_loss steps on disk. Used by tests/test_divergence.py."""
import gc
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import tb_scalars  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.run.logger import RunLogger  # noqa: E402

spec = importlib.util.spec_from_file_location("train_entry", REPO / "launch/train.py")
entry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(entry)
out_dir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out_dir="))
try:
    entry.main(sys.argv[1:])
except UserError as exc:
    loggers = [o for o in gc.get_objects() if isinstance(o, RunLogger) and o.writer is not None]
    print(json.dumps({"error": str(exc), "closed": [lg.writer.file_writer is None for lg in loggers],
                      "val_steps": sorted(tb_scalars(out_dir, "eval/val_loss"))}))
