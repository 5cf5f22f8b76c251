"""Tiny Shakespeare with the GPT-2 BPE: writes <data_dir>/shakespeare/{train,val}.bin and meta.pkl.

python data/shakespeare/prepare.py [--input=path/to/input.txt] [--data_dir=DIR]
"""
import sys
from pathlib import Path

# Runnable from any folder: this clone's trainer package first on sys.path.
REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from trainer.cli import run_main  # noqa: E402
from trainer.prepare.shakespeare import shakespeare_main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda argv: shakespeare_main(argv, __doc__, "shakespeare", "gpt2", REPO_ROOT / "data"))
