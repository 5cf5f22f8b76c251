"""data/prepare.py at corpus scale: peak memory and throughput against raw tiktoken, side by side.

python bench/prepare_scale.py [--sizes_mb=50,200,1000] [--file_mb=2] [--num_proc=N] [--workdir=DIR]

A size given more than once (--sizes_mb=50,50,50,200,200,200) is run that many times, each run with its
own raw measurements beside it, and a last table gives the median ratio per size: on a small shared
machine one 5-second run moves by 20% from one minute to the next.

For each size it generates a corpus of many files (tiny Shakespeare's lines, shuffled per file by
a seed, so no two files are alike), then in the same run:
  raw   one process encoding the corpus files with tiktoken's encode_ordinary on one core
        (this machine's single-core speed, measured right beside the prepare run, since the
        cores may be shared with other work),
  prepare   `python data/prepare.py --input=DIR --name=bench --val_fraction=0.0005`, with the
        peak memory of its whole process tree (the sum of the RSS of the main process and its
        workers, sampled every 50 ms with psutil).
It also counts CPU seconds (the prepare tree's from getrusage of reaped children, the raw process's
own): tokens per CPU second of prepare over raw's is its efficiency whatever else runs on the
machine; on a busy machine the wall-clock ratio also measures the other load.
Target: peak memory flat across sizes and under 1 GiB; prepare tokens/s >= 0.8 x cores x raw.
Prints a Markdown table (for bench/RESULTS.md).

python bench/prepare_scale.py --memory_only=jsonl|instructions [--sizes_mb=50,150]
  memory and time only, for the other streamed inputs: JSON lines of ~5 KB rows in 2 MB files
  (read through `datasets`), or one JSON-lines file of Alpaca records (--format=instructions);
  reports peak RSS and peak private memory (RSS minus file-backed pages such as memory-mapped
  Arrow files) of the process tree.
"""
import argparse
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
MiB = 2**20

RAW = """
import sys, time
sys.path.insert(0, sys.argv[1])
from trainer.data.tokenizer import gpt2_encoding
enc = gpt2_encoding()
files, budget = sys.argv[3:], float(sys.argv[2])
tokens = nbytes = 0
start, cpu = time.perf_counter(), time.process_time()
for path in files:  # as many files as fit in the time budget: a rate, not a total
    text = open(path, encoding="utf-8").read()
    tokens += len(enc.encode_ordinary(text))
    nbytes += len(text.encode())
    if time.perf_counter() - start > budget:
        break
print(tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu), nbytes)
"""


def make_corpus(folder, size_mb, file_mb, seed=0):
    """size_mb of text in files of file_mb, each a seeded shuffle of tiny Shakespeare's lines."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    n_files = max(1, round(size_mb / file_mb))
    for i in range(n_files):
        rng = random.Random(seed * 100_000 + i)
        out, size = [], 0
        while size < file_mb * MiB:
            line = lines[rng.randrange(len(lines))]
            out.append(line)
            size += len(line)
        (folder / f"{i:05d}.txt").write_text("".join(out))
    return sorted(folder.iterdir())


def raw_speed(files, budget_s):
    """(tokens/s, tokens per CPU second) of tiktoken alone in one process, over the corpus files."""
    proc = subprocess.run([sys.executable, "-c", RAW, str(REPO), str(budget_s), *map(str, files)],
                          capture_output=True, text=True, check=True)
    wall, cpu, _ = proc.stdout.split()
    return float(wall), float(cpu)


def raw_parallel(files, budget_s, n):
    """tokens/s of n raw processes at once (each on its share of the files), summed: the most n cores
    of tiktoken give under the machine's current load."""
    procs = [subprocess.Popen([sys.executable, "-c", RAW, str(REPO), str(budget_s), *map(str, files[i::n])],
                              stdout=subprocess.PIPE, text=True) for i in range(n)]
    return sum(float(p.communicate()[0].split()[0]) for p in procs)


def tree_rss(proc):
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_prepare(corpus, data_dir, num_proc):
    """(seconds, tokens written, peak RSS of the process tree, CPU seconds of the tree) of one data/prepare.py run."""
    args = [sys.executable, str(REPO / "data/prepare.py"), f"--input={corpus}", "--name=bench",
            f"--data_dir={data_dir}", "--val_fraction=0.0005"] + ([f"--num_proc={num_proc}"] if num_proc else [])
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = psutil.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    out, err = proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers' time too: reaped by prepare, then by us
    cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    if proc.returncode:
        sys.exit(f"prepare failed:\n{out[-2000:]}\n{err[-2000:]}")
    tokens = sum((Path(data_dir) / "bench" / f"{s}.bin").stat().st_size // 2 for s in ("train", "val"))
    return seconds, tokens, peak, cpu_s


def tree_memory(proc):
    """(RSS, private = RSS minus file-backed shared pages) summed over the process tree."""
    rss = private = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            m = p.memory_info()
        except psutil.NoSuchProcess:
            continue
        rss, private = rss + m.rss, private + m.rss - m.shared
    return rss, private


def make_rows_corpus(folder, size_mb, kind):
    import json
    folder.mkdir(parents=True, exist_ok=True)
    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    words = SHAKESPEARE.read_text().split()
    rng = random.Random(0)
    if kind == "jsonl":
        for i in range(max(1, round(size_mb / 2))):
            records, size = [], 0
            while size < 2 * MiB:
                text = "".join(lines[rng.randrange(len(lines))] for _ in range(100))
                records.append(json.dumps({"text": text}))
                size += len(text)
            (folder / f"{i:05d}.jsonl").write_text("\n".join(records) + "\n")
        return []
    with open(folder / "records.jsonl", "w") as f:
        size = 0
        while size < size_mb * 1e6:
            i = rng.randrange(len(words) - 200)
            line = json.dumps({"instruction": " ".join(words[i:i + 20]),
                               "output": " ".join(words[i + 20:i + 20 + rng.randint(5, 150)])}) + "\n"
            f.write(line)
            size += len(line)
    return ["--format=instructions", "--block_size=512"]


def memory_only(kind, sizes, work):
    print("| input | size | peak RSS (process tree) | peak private memory | time | load average |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        corpus = work / f"{kind}-{size:g}mb"
        extra = make_rows_corpus(corpus, size, kind)
        env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf-cache")}
        load, start = os.getloadavg()[0], time.perf_counter()
        proc = psutil.Popen([sys.executable, str(REPO / "data/prepare.py"), f"--input={corpus}", "--name=bench",
                             f"--data_dir={work / 'out'}", *extra], env=env, stdout=subprocess.DEVNULL)
        peak = (0, 0)
        while proc.poll() is None:
            peak = tuple(map(max, peak, tree_memory(proc)))
            time.sleep(0.05)
        if proc.returncode:
            sys.exit(f"prepare failed on {corpus}")
        nbytes = sum(f.stat().st_size for f in corpus.iterdir())
        print(f"| {kind} | {nbytes / 1e6:,.0f} MB | {peak[0] / MiB:,.0f} MiB | {peak[1] / MiB:,.0f} MiB | "
              f"{time.perf_counter() - start:.0f} s | {load:.1f} |", flush=True)
        shutil.rmtree(corpus)
        shutil.rmtree(work / "hf-cache", ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_mb", default="50,200,1000")
    parser.add_argument("--file_mb", type=float, default=2.0)
    parser.add_argument("--num_proc", type=int, default=None, help="default: prepare's own (all cores)")
    parser.add_argument("--raw_seconds", type=float, default=20, help="time spent measuring raw tiktoken per size")
    parser.add_argument("--workdir", default=None, help="where corpora and outputs go (default: a temp folder)")
    parser.add_argument("--parallel_raw", action="store_true",
                        help="also run `cores` raw processes at once, before and after prepare: the ceiling under "
                             "the same load (for a shared machine)")
    parser.add_argument("--memory_only", default=None, help="jsonl or instructions: memory and time of those inputs")
    args = parser.parse_args()
    if args.memory_only:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="prepare-scale-"))
        try:
            memory_only(args.memory_only, list(map(float, args.sizes_mb.split(","))), work)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
        return
    cores = args.num_proc or len(os.sched_getaffinity(0))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prepare-scale-"))
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores used of {os.cpu_count()}, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows, parallel = [], []
    try:
        for size in map(float, args.sizes_mb.split(",")):
            corpus = work / f"corpus-{size:g}mb"
            files = make_corpus(corpus, size, args.file_mb)
            nbytes = sum(f.stat().st_size for f in files)
            raw_before, raw_cpu_before = raw_speed(files, args.raw_seconds / 2)
            par_before = raw_parallel(files, args.raw_seconds / 2, cores) if args.parallel_raw else None
            load = os.getloadavg()[0]
            seconds, tokens, peak, cpu_s = run_prepare(corpus, work / "out", args.num_proc)
            par_after = raw_parallel(files[::-1], args.raw_seconds / 2, cores) if args.parallel_raw else None
            raw_after, raw_cpu_after = raw_speed(files[::-1], args.raw_seconds / 2)
            if args.parallel_raw:
                par = (par_before + par_after) / 2
                parallel.append((nbytes, tokens / seconds, par, tokens / seconds / par))
                print(f"{cores} raw processes at once: {par:,.0f} tokens/s (before {par_before:,.0f}, after "
                      f"{par_after:,.0f}); prepare / that = {tokens / seconds / par:.2f}", flush=True)
            raw, raw_cpu = (raw_before + raw_after) / 2, (raw_cpu_before + raw_cpu_after) / 2
            rate = tokens / seconds
            rows.append((nbytes, len(files), tokens, seconds, peak, rate, raw, rate / (cores * raw),
                         tokens / cpu_s, raw_cpu, tokens / cpu_s / raw_cpu, load))
            print(f"{nbytes / 1e6:,.0f} MB in {len(files)} files: {tokens:,} tokens in {seconds:.1f} s = "
                  f"{rate:,.0f} tokens/s, {cpu_s:.1f} CPU s; raw tiktoken {raw:,.0f} tokens/s on one core "
                  f"(before {raw_before:,.0f}, after {raw_after:,.0f}), {raw_cpu:,.0f} per CPU s; "
                  f"peak RSS {peak / MiB:,.0f} MiB; load average {load:.1f}", flush=True)
            shutil.rmtree(corpus)
            shutil.rmtree(work / "out", ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"| corpus | files | tokens | time | peak memory (process tree) | prepare tokens/s | "
          f"raw tiktoken tokens/s (1 process) | prepare / ({cores} x raw) | prepare tokens per CPU s | "
          f"raw tokens per CPU s | CPU efficiency | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for nbytes, n_files, tokens, seconds, peak, rate, raw, ratio, per_cpu, raw_cpu, eff, load in rows:
        print(f"| {nbytes / 1e6:,.0f} MB | {n_files} | {tokens:,} | {seconds:.1f} s | {peak / MiB:,.0f} MiB | "
              f"{rate:,.0f} | {raw:,.0f} | {ratio:.2f} | {per_cpu:,.0f} | {raw_cpu:,.0f} | {eff:.2f} | {load:.1f} |")
    sizes = sorted({round(r[0] / 1e6) for r in rows})
    if len(sizes) < len(rows):  # a size given more than once (--sizes_mb=50,50,50): the median of its runs
        print()
        print(f"| corpus | runs | median prepare / ({cores} x raw) | range |" + (" median prepare / (raw processes at "
              "once) |" if parallel else ""))
        print("|---|---|---|---|" + ("---|" if parallel else ""))
        for size in sizes:
            ratios = [r[7] for r in rows if round(r[0] / 1e6) == size]
            line = (f"| {size:,} MB | {len(ratios)} | {statistics.median(ratios):.2f} | "
                    f"{min(ratios):.2f}-{max(ratios):.2f} |")
            if parallel:
                line += f" {statistics.median(p[3] for p in parallel if round(p[0] / 1e6) == size):.2f} |"
            print(line)
    if parallel:
        print()
        print(f"| corpus | prepare tokens/s | {cores} raw processes at once, tokens/s | prepare / that |")
        print("|---|---|---|---|")
        for nbytes, rate, par, ratio in parallel:
            print(f"| {nbytes / 1e6:,.0f} MB | {rate:,.0f} | {par:,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
