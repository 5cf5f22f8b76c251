"""What the checksums of a checkpoint cost: a save through trainer/run/checkpoint_save.write_hashed (sha256 while
writing, then fsync) against torch.save to the path and an fsync (the save before checksums), and verifying it
(check_manifest) against reading it back; and what reading it as data only costs (trainer/run/safe_load.py): the
check of every torch file before DeepSpeed's loaders touch it (check_folder: the pickle parsed, the tensors
memory-mapped, not read), and a full load with weights_only=True against torch.load(weights_only=False).

python bench/checkpoint_checksums.py [--n_layer=12 --n_embd=768] [--workdir=DIR] [--repeats=3]

The checkpoint is the one file a ZeRO-0 fp32 run saves, mp_rank_00_model_states.pt, for GPT-2 124M by default:
the module's weights and AdamW's two moments, 3 x 4 bytes per parameter (1.5 GB). Each step is timed
`--repeats` times (the best is printed: the machine is shared); the page cache is warm, as right after a save
or when a resume reads what it verifies. Prints a Markdown table (for bench/RESULTS.md).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's trainer

import torch  # noqa: E402

from trainer.model.shapes import gpt2_tensor_numels  # noqa: E402
from trainer.run.checkpoint import MANIFEST, check_manifest, file_digest  # noqa: E402
from trainer.run.checkpoint_save import write_hashed, write_manifest  # noqa: E402
from trainer.run.safe_load import check_folder, load  # noqa: E402


def best_of(repeats, step):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def save_and_fsync(state, path):
    """What a save did per file before checksums: torch.save to the path, then an fsync (write_manifest)."""
    torch.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_back(path):
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--workdir", default=None)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    numels = gpt2_tensor_numels(args.n_layer, args.n_embd, 50304, 1024)
    weights = [torch.randn(n) for n in numels]
    state = {"module": weights, "optimizer": {"exp_avg": [torch.randn(n) for n in numels],
                                              "exp_avg_sq": [torch.rand(n) for n in numels]}}
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        folder = work / "iter0000001"
        folder.mkdir()
        path = folder / "mp_rank_00_model_states.pt"
        plain = best_of(args.repeats, lambda: save_and_fsync(state, path))
        hashed = best_of(args.repeats, lambda: write_hashed(path, lambda f: torch.save(state, f)))
        size, sha = write_hashed(path, lambda f: torch.save(state, f))
        write_manifest(folder, {path.name: (size, sha)})
        assert json.loads((folder / MANIFEST).read_text())["files"][path.name]["sha256"] == file_digest(path)
        read = best_of(args.repeats, lambda: read_back(path))
        verify = best_of(args.repeats, lambda: check_manifest(folder))
        assert check_manifest(folder) is None
        as_data = best_of(args.repeats, lambda: check_folder(folder))
        assert check_folder(folder) is None
        unsafe = best_of(args.repeats, lambda: torch.load(path, map_location="cpu", weights_only=False))
        safe = best_of(args.repeats, lambda: load(path))
    finally:
        shutil.rmtree(work)
    gb = size / 1e9
    print(f"GPT-2 (n_layer={args.n_layer}, n_embd={args.n_embd}), {sum(numels) / 1e6:.0f}M parameters: one "
          f"checkpoint file of {gb:.2f} GB (weights + AdamW moments, fp32), best of {args.repeats}\n")
    print("| step | seconds | GB/s |\n|---|---|---|")
    for name, seconds in (("torch.save to the path, fsync (before)", plain), ("write_hashed: torch.save through sha256, "
                          "fsync (now)", hashed), ("reading the file back (no check)", read),
                          ("check_manifest: sha256 of the file (resume, export, sample, eval)", verify),
                          ("safe_load.check_folder: the pickle checked as data, tensors memory-mapped", as_data),
                          ("torch.load(weights_only=False), the whole file", unsafe),
                          ("safe_load.load: torch.load(weights_only=True) + allowlist, the whole file", safe)):
        print(f"| {name} | {seconds:.2f} | {gb / seconds:.2f} |")
    print(f"\nsave overhead: {hashed - plain:+.2f} s ({100 * (hashed / plain - 1):+.0f}%); verification: "
          f"{verify:.2f} s per checkpoint, {verify / gb:.2f} s per GB")


if __name__ == "__main__":
    main(sys.argv[1:])
