"""Loss and perplexity: `python launch/eval.py --out_dir=out-lora [--dataset=NAME | --text=FILE] [--compare_base]`.

--out_dir is a training run (its latest checkpoint; LoRA runs too), an exported Hugging Face directory
or a GPT-2 hub name. Without --dataset/--text a run is evaluated on its own dataset(s). A dataset is
evaluated on its whole val split (instruction data with the training masking: response tokens only,
each packed example on its own); a text file is tokenized with the model's tokenizer. Perplexity is
exp of the mean token loss. --compare_base evaluates the model the run started from (its init_from,
or --base) on the same tokens and prints the change: what the finetune cost on general text.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's trainer, even if another is installed

from trainer.cli import FlagParser, at_least, run_main  # noqa: E402
from trainer.errors import UserError  # noqa: E402


def parse_args(argv):
    p = FlagParser(__doc__)
    p.add_argument("--out_dir", required=True, help="a training run, an exported HF directory, or a GPT-2 hub name")
    p.add_argument("--dataset", default=None, help="a prepared dataset under --data_dir (default: the run's)")
    p.add_argument("--text", default=None, help="a UTF-8 text file to evaluate on instead of a dataset")
    p.add_argument("--data_dir", default=None, help="datasets folder (default: the run's data_dir, else data)")
    p.add_argument("--compare_base", action="store_true", help="also evaluate the starting model and print the change")
    p.add_argument("--base", default=None, help="the starting model for --compare_base (default: the run's init_from)")
    p.add_flag("--block_size", type=int, default=0, rule=at_least(0), help="context per window (default: the model's)")
    p.add_flag("--batch_size", type=int, default=8, rule=at_least(1))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return p.parse(argv)


def load_model(source):
    from trainer.tools.loading import load_for_inference
    return load_for_inference(source)


def read_text(path):
    from trainer.prepare.utf8 import read_utf8
    if not Path(path).is_file():
        raise UserError(f"--text={path}: no such file")
    return read_utf8(Path(path))


def text_tokens(path, text, tokenizer):
    tokens = tokenizer.encode_ordinary(text)
    if len(tokens) < 2:
        raise UserError(f"--text={path} has {len(tokens)} token(s); give at least two")
    return tokens


def open_dataset(directory, tokenizer, block_size):
    """TokenData for evaluation: a packed dataset at its own block size, a text one at `block_size`."""
    from trainer.data.tokenizer import tokenizer_kind
    from trainer.data.tokens import TokenData, read_meta
    if not Path(directory).is_dir():
        raise UserError(f"dataset folder {directory} does not exist; prepare it or pass --data_dir/--dataset")
    meta = read_meta(directory)
    kind = tokenizer_kind(meta)
    if kind != tokenizer.name or (kind == "char" and meta["stoi"] != tokenizer.stoi):
        raise UserError(f"{directory} was prepared with the {kind} tokenizer, but the model uses "
                        f"{tokenizer.name}; evaluate on data prepared for this model, or use --text=FILE")
    if meta.get("format") == "instructions":
        if meta["block_size"] > block_size:
            raise UserError(f"{directory} is packed for block_size={meta['block_size']}, more than the model's "
                            f"{block_size}; prepare it again with --block_size={block_size}")
        block_size = meta["block_size"]
    return TokenData(directory, block_size)


def targets(args, loaded, block_size, text=None):
    """[(label, evaluate(lm, device) -> EvalResult)] for what this command asks for."""
    from trainer.tools.evaluate import evaluate_dataset, evaluate_stream
    if args.text and args.dataset:
        raise UserError("give --dataset or --text, not both")
    if args.text:
        tokens = text_tokens(args.text, text, loaded.tokenizer)
        return [(f"text {args.text}", lambda lm, dev: evaluate_stream(lm, tokens, block_size, args.batch_size, dev))]
    run = loaded.run_config or {}
    names = [args.dataset] if args.dataset else run.get("dataset")
    if not names:
        raise UserError(f"{args.out_dir} is not a training run, so it has no dataset: "
                        f"give --dataset=NAME or --text=FILE")
    names = [names] if isinstance(names, str) else names
    data_dir = Path(args.data_dir or run.get("data_dir") or "data")
    out = []
    for name in names:
        data = open_dataset(data_dir / name, loaded.tokenizer, block_size)
        kind = "instruction blocks, response tokens" if data.packed else "all tokens"
        out.append((f"{name} val ({kind})", lambda lm, dev, d=data: evaluate_dataset(lm, d, args.batch_size, dev)))
    return out


def base_source(args, loaded):
    if args.base:
        return args.base
    init_from = (loaded.run_config or {}).get("init_from")
    if init_from is None:
        raise UserError(f"{args.out_dir} is not a training run, so its starting model is unknown: pass --base=MODEL")
    if init_from == "scratch":
        raise UserError(f"{args.out_dir} was trained from scratch: there is no base model to compare with "
                        f"(pass --base=MODEL to compare with another one)")
    return init_from


def result_dict(r):
    return {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}


def main(argv):
    args = parse_args(argv)
    # the text file read before the 6-7 s of imports: an unreadable or non-UTF-8 file is one line at once
    text = read_text(args.text) if args.text else None
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    loaded = load_model(args.out_dir)
    block_size = args.block_size or loaded.block_size
    if not 1 <= block_size <= loaded.block_size:
        raise UserError(f"--block_size={block_size} must be between 1 and the model's {loaded.block_size}")
    jobs = targets(args, loaded, block_size, text)
    base = None
    if args.compare_base:
        source = base_source(args, loaded)
        base = load_model(source)
        if base.tokenizer.name != loaded.tokenizer.name:
            raise UserError(f"the base {source} uses the {base.tokenizer.name} tokenizer, the model "
                            f"{loaded.tokenizer.name}: their losses are not comparable")
        if base.block_size < block_size:
            raise UserError(f"the base {source} has {base.block_size} positions, fewer than block_size="
                            f"{block_size}; pass --block_size={base.block_size}")

    report = {"model": args.out_dir, "block_size": block_size, "results": []}
    for label, run in jobs:
        result = run(loaded.lm, device)
        entry = {"data": label, **result_dict(result)}
        lines = [f"{label}: loss {result.loss:.6f}, perplexity {result.perplexity:.6g} ({result.tokens:,} tokens)"]
        if base is not None:
            before = run(base.lm, device)
            entry["base"] = {"model": source, **result_dict(before)}
            entry["change"] = {"loss": result.loss - before.loss,
                               "perplexity": result.perplexity - before.perplexity,
                               "perplexity_percent": 100 * (result.perplexity / before.perplexity - 1)}
            lines.append(f"  base {source}: loss {before.loss:.6f}, perplexity {before.perplexity:.6g}")
            lines.append(f"  change: loss {entry['change']['loss']:+.6f}, perplexity "
                         f"{entry['change']['perplexity']:+.6g} ({entry['change']['perplexity_percent']:+.1f}%)")
        report["results"].append(entry)
        if not args.json:
            print("\n".join(lines), flush=True)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    run_main(main)
