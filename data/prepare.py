"""Prepare your own text for training: writes <data_dir>/<name>/{train,val}.bin and meta.pkl.

python data/prepare.py --input=FILE|FOLDER|GLOB|hf:NAME --name=NAME [--tokenizer=gpt2|char]
    [--val_fraction=0.1] [--seed=1337] [--text_field=text] [--num_proc=N]
python data/prepare.py --input=alpaca.json --name=NAME --format=instructions [--template=alpaca|plain]
    [--block_size=1024] [--overlong=truncate|drop] [--skip_invalid] [--columns=JSON]
    (JSON list or JSONL of Alpaca, Dolly, chat or ShareGPT records; other field names through --columns,
    e.g. --columns='{"instruction": "question", "output": "answer"}'; see docs/instructions.md)
Text files (.gz too) are one document each; .jsonl/.json/.parquet/.csv files, a folder saved by
datasets' save_to_disk and hf:NAME (a hub dataset) give one document per row (its --text_field).
A folder is read recursively in sorted order (hidden and binary files skipped);
quote a glob so the shell passes it through: --input='notes/**/*.md'.
One document is split as nanoGPT does (the last val_fraction of its characters for val); many are
split by whole documents, round(n x val_fraction) drawn by --seed. The corpus is streamed: memory
stays bounded whatever its size, and the previous dataset of that name is replaced only at the end.
See docs/data.md.
"""
import sys
from pathlib import Path

# Runnable from any folder: this clone's trainer package first on sys.path.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from trainer.cli import FlagParser, at_least, run_main  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.prepare.corpus import TOKENIZERS  # noqa: E402
from trainer.prepare.cutting import CHUNK_BYTES  # noqa: E402
from trainer.prepare.instructions import BLOCK_SIZE, OVERLONG  # noqa: E402
from trainer.prepare.split import check_val_fraction  # noqa: E402

FORMATS = ("text", "instructions")


def parse_args(argv):
    parser = FlagParser(__doc__)
    parser.add_argument("--input", required=True, help="a text file, a folder of them, or a glob")
    parser.add_argument("--name", required=True, help="dataset name: the folder under data_dir, and the recipe's dataset")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 (BPE, for finetuning GPT-2) or char")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="one document: share of its characters, at the end, for validation; "
                             "many: share of the documents (nanoGPT's openwebtext: 0.0005)")
    parser.add_argument("--format", default="text",
                        help="text, or instructions (Alpaca, Dolly, chat or ShareGPT records, JSON or JSONL)")
    parser.add_argument("--template", default="alpaca", help="instructions: prompt template, alpaca or plain")
    parser.add_flag("--block_size", type=int, default=1024, rule=BLOCK_SIZE,
                    help="instructions: pack examples into blocks for this block_size")
    parser.add_argument("--overlong", default="truncate", help="instructions: an example longer than a block is truncated or dropped")
    parser.add_argument("--skip_invalid", action="store_true", help="instructions: drop malformed records (and count them) instead of stopping")
    parser.add_argument("--columns", default="",
                        help="instructions: a JSON object naming your fields, our field -> yours, e.g. "
                             "'{\"instruction\": \"question\", \"output\": \"answer\"}' (our fields: instruction, "
                             "input, output, messages, conversations)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the train/val draw of documents (or examples)")
    parser.add_argument("--text_field", default="text", help="rows (jsonl, json, parquet, csv, datasets): the text column")
    parser.add_argument("--split", default="train", help="saved DatasetDict or hub dataset: the split to read")
    parser.add_flag("--num_proc", type=int, default=None, rule=at_least(1),
                    help="worker processes (default: all cores)")
    parser.add_flag("--chunk_bytes", type=int, default=CHUNK_BYTES, rule=at_least(1024),
                    help="text per piece of work (memory grows with it; default 4 MiB)")
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "data"), help="datasets folder (default: the repo's data/)")
    return parser.parse(argv)


def check_args(args):
    # Check everything before reading the input, so a typo fails in no time; the preparation functions
    # take these values as checked (the numbers' ranges are the parser's rules).
    for flag, choices in (("format", FORMATS), ("tokenizer", TOKENIZERS), ("overlong", OVERLONG)):
        if getattr(args, flag) not in choices:
            raise UserError(f"unknown --{flag}={getattr(args, flag)} (choose {' or '.join(choices)})")
    # The name becomes one folder under data_dir, never a path out of it.
    if not args.name or args.name in (".", "..") or "/" in args.name or "\\" in args.name:
        raise UserError(f"--name must be a plain folder name, got {args.name!r}")
    check_val_fraction(args.val_fraction)
    if args.columns and args.format != "instructions":
        raise UserError("--columns names the fields of instruction records; add --format=instructions (a text "
                        "corpus names its column with --text_field)")


def main(argv):
    args = parse_args(argv)
    check_args(args)
    if args.format == "instructions":
        from trainer.prepare.instructions import prepare_instructions
        from trainer.prepare.records import parse_columns
        columns = parse_columns(args.columns)  # a mistake in the map stops here, before the input is read
        prepare_instructions(args.input, Path(args.data_dir) / args.name, args.template, args.block_size,
                             args.val_fraction, args.skip_invalid, args.overlong, args.seed, args.tokenizer,
                             args.num_proc, columns)
        return 0
    from trainer.prepare.corpus import prepare_corpus
    prepare_corpus(args.input, Path(args.data_dir) / args.name, args.tokenizer, args.val_fraction,
                            args.seed, args.text_field, args.num_proc, args.chunk_bytes, args.split)
    return 0


if __name__ == "__main__":
    run_main(main)
