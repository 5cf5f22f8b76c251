"""Benchmark: batched answer decoding (trainer/model/generate.py) against transformers' `generate`.

    python bench/generate_speed.py [--n_layer=12 --n_head=12 --n_embd=768] [--batch=8] [--new_tokens=64]
                                   [--repeats=3] [--device=cpu] [--results=bench/RESULTS.md]

One GPT-2 of the given shape (random weights: the speed does not depend on them), one batch of prompts of
16 to 48 tokens, greedy, the same number of new tokens for both (end-of-text as the stop token; a random
model does not reach it in so few tokens, which is checked): `generate_answers(lm, prompts, ...)` against
`lm.generate(input_ids, attention_mask, max_new_tokens, do_sample=False)` on the same left-padded batch,
alternately, `--repeats` times each; the answers must be equal token for token. The fastest time of each
is reported as new tokens per second, beside the fewest CPU seconds (steadier on a shared machine); the
table is appended to the results file with the machine.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tables import publish  # noqa: E402
from trainer.data.tokenizer import GPT2_EOT  # noqa: E402
from trainer.model.generate import generate_answers  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_positions=1024)
    lm = GPT2LMHeadModel(config).eval().to(args.device)
    lm.config._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50000, (int(n),), generator=gen).tolist()
               for n in torch.randint(16, 49, (args.batch,), generator=gen)]
    width = max(map(len, prompts))
    ids = torch.tensor([[GPT2_EOT] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)

    def ours():
        return generate_answers(lm, prompts, 1024, args.new_tokens, GPT2_EOT, batch_size=args.batch)

    def theirs():
        out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                          pad_token_id=GPT2_EOT, eos_token_id=GPT2_EOT)
        return out[:, width:].tolist()

    times, cpu, answers = {"trainer": [], "transformers": []}, {"trainer": [], "transformers": []}, {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in (("trainer", ours), ("transformers", theirs)):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start, start_cpu = time.perf_counter(), time.process_time()
                answers[name] = fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    assert answers["trainer"] == answers["transformers"], "the two decodings differ"
    assert all(len(a) == args.new_tokens for a in answers["trainer"]), "a row stopped early: use fewer new tokens"

    tokens = args.batch * args.new_tokens
    best = {name: min(t) for name, t in times.items()}
    command = "python bench/generate_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"### batched greedy decoding vs transformers' generate ({time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()}, {os.cpu_count()} cores, load average {load}, {args.device}, "
             f"torch {torch.__version__})", "",
             f"`{command.strip()}`: GPT-2 {args.n_layer} layers x {args.n_embd} (random weights), {args.batch} "
             f"prompts of 16-48 tokens left-padded, {args.new_tokens} new tokens each, greedy; fastest of "
             f"{args.repeats}, alternating. Answers equal token for token.", "",
             "| decoding | seconds | new tokens/s | CPU seconds (fewest) | all runs: seconds |",
             "|---|---|---|---|---|"]
    for name, label in (("trainer", "trainer/model/generate.generate_answers"),
                        ("transformers", "transformers GPT2LMHeadModel.generate")):
        lines.append(f"| {label} | {best[name]:.3f} | {tokens / best[name]:,.0f} | {min(cpu[name]):.3f} | "
                     f"{', '.join(f'{t:.3f}' for t in times[name])} |")
    lines.append("")
    lines.append(f"Ratio: the trainer's decoding takes {best['trainer'] / best['transformers']:.2f}x the time "
                 f"({min(cpu['trainer']) / min(cpu['transformers']):.2f}x the CPU time) of transformers' generate.")
    publish("\n".join(lines), args.results)


if __name__ == "__main__":
    main()
