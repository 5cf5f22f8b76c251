"""Tiny Shakespeare by characters: writes <data_dir>/shakespeare_char/{train,val}.bin and meta.pkl.

python data/shakespeare_char/prepare.py [--input=path/to/input.txt] [--data_dir=DIR]
"""
import sys
from pathlib import Path

# Runnable from any folder: this clone's trainer package first on sys.path.
REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from trainer.cli import run_main  # noqa: E402
from trainer.prepare.shakespeare import shakespeare_main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda argv: shakespeare_main(argv, __doc__, "shakespeare_char", "char", REPO_ROOT / "data"))
