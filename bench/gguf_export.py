"""Benchmark: the GGUF export per type against the transformers export of the same run.

    python bench/gguf_export.py [--out_dir=RUN] [--n_layer=12 --n_head=12 --n_embd=768] [--new_tokens=64]
                                [--results=bench/RESULTS.md]

Without --out_dir, a GPT-2 of the given shape (random weights; GPT-2 124M by default) is trained two steps on
tiny Shakespeare's BPE tokens (block 256) to make a run. The run is exported with merge_adapter.py's export()
as a transformers model (fp32) and as GGUF f32, f16 and q8_0. Per type: the file's size; the maximum logit
difference the export's own check measured (llama.cpp against the trained model, on the fixed batch);
perplexity on 4 windows of 256 val tokens, llama.cpp on the file against transformers on the HF export; and
greedy decoding speed from a 16-token prompt, llama.cpp (llama-cpp-python, its default threads: half the CPUs) against
transformers' `generate` (KV cache, fp32) on the HF export, new tokens per second, the best of 3.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.tools import gguf_export  # noqa: E402
from trainer.tools.export import export, refusals, val_folder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="a run or nanoGPT checkpoint to export (default: make one)")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    return p.parse_args(argv)


def make_run(args, root):
    """A random GPT-2 of the shape, trained two steps: a run with a checkpoint and tiny Shakespeare's val.bin."""
    import subprocess
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).save_pretrained(
        root / "base")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, REPO / "data/shakespeare/prepare.py", f"--data_dir={root / 'data'}"],
                   check=True, env=env, cwd=REPO)
    subprocess.run([sys.executable, REPO / "launch/train.py", "--dataset=shakespeare", f"--data_dir={root / 'data'}",
                    f"--init_from={root / 'base'}", "--mode=full", "--block_size=256", "--batch_size=2",
                    "--gradient_accumulation_steps=1", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                    "--tensorboard=False", "--always_save_checkpoint=True", "--sample_max_new_tokens=0",
                    f"--out_dir={root / 'run'}"], check=True, env=env, cwd=REPO)
    return root / "run"


def best_rate(generate, new_tokens, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate()
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as scratch:
        root = Path(scratch)
        out_dir = Path(args.out_dir) if args.out_dir else make_run(args, root)
        hf = export(out_dir, root / "hf")
        lm = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
        block = lm.config.n_positions
        source = refusals(out_dir, "fp32", False, "original", "f32")
        x, y, where = gguf_export.val_windows(val_folder(source), source.meta, block)
        with torch.no_grad():
            hf_ppl = gguf_export.perplexity(lm(input_ids=x).logits, y)
        prompt = x[0, :16]
        with torch.no_grad():
            hf_rate = best_rate(lambda: lm.generate(prompt[None], max_new_tokens=args.new_tokens, do_sample=False,
                                                    min_new_tokens=args.new_tokens, pad_token_id=0),
                                args.new_tokens, args.repeats)
        hf_size = sum(p.stat().st_size for p in (root / "hf").glob("*.safetensors"))
        rows = [("transformers (HF export, fp32)", hf_size, hf["max_abs_diff"], hf_ppl, hf_rate)]
        for gguf_type in ("f32", "f16", "q8_0"):
            result = export(out_dir, root / gguf_type, gguf_type=gguf_type)
            path = root / gguf_type / gguf_export.GGUF_FILE
            llama = gguf_export.LlamaCppModel(path, block)
            ppl = gguf_export.perplexity(llama.logits(x), y)

            def generate():
                llama.llm.reset()
                for i, _ in enumerate(llama.llm.generate(prompt.tolist(), temp=0.0, top_k=1, reset=True)):
                    if i + 1 == args.new_tokens:
                        break

            rate = best_rate(generate, args.new_tokens, args.repeats)
            llama.close()
            rows.append((f"GGUF {gguf_type} (llama.cpp)", path.stat().st_size, result["max_abs_diff"], ppl, rate))
    shape = f"{args.n_layer} layers, {args.n_embd} wide" if not args.out_dir else str(args.out_dir)
    lines = [f"### GGUF export per type: {shape} ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"{os.cpu_count()} cores, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}, "
             f"torch {torch.__version__})", "",
             f"`python bench/gguf_export.py {' '.join(sys.argv[1:])}`; perplexity on {x.size(0)}x{x.size(1)} "
             f"tokens of {where}; speed: greedy, {args.new_tokens} new tokens after 16, best of {args.repeats}.", "",
             "| export | file | max logit diff vs trained | perplexity | vs HF export | new tokens/s |",
             "|---|---|---|---|---|---|"]
    for name, size, diff, ppl, rate in rows:
        lines.append(f"| {name} | {size / 2**20:.1f} MiB | {diff:.2e} | {ppl:.2f} | {ppl / hf_ppl - 1:+.3%} | "
                     f"{rate:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
