"""Tiny Shakespeare by characters: writes <data_dir>/shakespeare_char/{train,val}.bin and meta.pkl.

python data/shakespeare_char/prepare.py [--input=path/to/input.txt] [--data_dir=DIR]
"""
import sys
from pathlib import Path

# Runnable from any folder: make the repo's `trainer` package importable.
REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from trainer import textprep  # noqa: E402

if __name__ == "__main__":
    textprep.run_cli(lambda: textprep.shakespeare_main(__doc__, "shakespeare_char", "char", REPO_ROOT / "data"))
