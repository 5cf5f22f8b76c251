"""Tiny Shakespeare, as nanoGPT's data/shakespeare*/prepare.py read it: the body of both scripts.

The text (public domain) ships with the repo in data/tinyshakespeare.txt: nothing to download unless
that file was deleted.
"""
import urllib.error
import urllib.request
from pathlib import Path

from trainer.cli import FlagParser, at_least
from trainer.errors import UserError
from trainer.files import atomic_write
from trainer.prepare.corpus import prepare_corpus

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"


def download_tiny_shakespeare(dest: Path, url: str = TINY_SHAKESPEARE_URL, timeout: float = 15) -> None:
    """Fetch tiny Shakespeare into dest (atomically, so no half file stays)."""
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"could not download tiny Shakespeare ({reason}); pass --input=path/to/input.txt"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, data)


def shakespeare_input(input_arg: str | None, dataset_dir: Path) -> str:
    """--input if given, else dataset_dir/input.txt if present, else the repo's copy (downloaded only if deleted)."""
    if input_arg:
        return input_arg
    local = dataset_dir / "input.txt"
    if local.exists():
        return str(local)
    if TINY_SHAKESPEARE.is_file():
        return str(TINY_SHAKESPEARE)
    download_tiny_shakespeare(local)
    return str(local)


def shakespeare_main(argv, description: str, name: str, tokenizer: str, default_data_dir: Path) -> int:
    """The body of data/shakespeare*/prepare.py, which differ only in name and tokenizer."""
    parser = FlagParser(description)
    parser.add_argument("--input", help="tiny Shakespeare text (default: <data_dir>/<name>/input.txt if present, "
                                        "else the repo's data/tinyshakespeare.txt)")
    parser.add_argument("--data_dir", default=str(default_data_dir), help="datasets folder (default: the repo's data/)")
    parser.add_flag("--num_proc", type=int, default=None, rule=at_least(1),
                    help="worker processes (default: all cores)")
    args = parser.parse(argv)
    out_dir = Path(args.data_dir) / name
    prepare_corpus(shakespeare_input(args.input, out_dir), out_dir, tokenizer, num_proc=args.num_proc)
    return 0
