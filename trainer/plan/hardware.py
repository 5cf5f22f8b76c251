"""The hardware a plan is for: detected (this rank's GPU, or system memory on a CPU-only machine) or given
(--vram_gb, --gpus), the share of its memory a plan may use, and each GPU's peak FLOP/s for MFU.

torch is imported only to detect a GPU, and not at all when --vram_gb is given or the machine has no GPU
driver (--plan then answers in well under a second instead of importing torch for seconds).
"""
import os
import re
import sys
from dataclasses import dataclass

from trainer.launcher import local_rank
from trainer.units import GiB, format_bytes

USABLE_FRACTION_GPU = 0.95        # plan into this share of a GPU's memory; the rest is headroom
USABLE_FRACTION_CPU = 0.80        # share of *available* system memory (other processes, page cache)


@dataclass(frozen=True)
class Hardware:
    """What a plan is made for."""
    device_type: str          # 'cuda' or 'cpu'
    bytes_per_device: int     # total memory per GPU, or this rank's share of available system memory
    n_devices: int            # data-parallel ranks
    bf16: bool                # bf16 supported (cuda only)
    name: str                 # e.g. 'NVIDIA H100 80GB' or 'CPU (no GPU): system memory'


def _available_system_memory():
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# A GPU torch can use needs its driver's device node: NVIDIA's /dev/nvidiactl, /dev/dxg under WSL 2, ROCm's
# /dev/kfd. Where none exists and torch is not imported yet (--plan), there is no GPU to ask torch about.
GPU_DRIVER_NODES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _cuda_properties():
    """(name, total bytes, bf16 tensor cores) of this rank's GPU, or None without one."""
    if "torch" not in sys.modules and not any(os.path.exists(node) for node in GPU_DRIVER_NODES):
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = local_rank() % torch.cuda.device_count()
    props = torch.cuda.get_device_properties(index)
    # bf16 tensor cores from compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() also counts
    # emulation and says True on V100 (7.0) and T4 (7.5), which must train in fp16 with loss scaling
    return props.name, int(props.total_memory), torch.cuda.get_device_capability(index) >= (8, 0)


def detect_hardware(world_size, vram_gb=None, gpus=None):
    """The hardware to plan for. `vram_gb` (GiB, as nvidia-smi counts) and `gpus` override detection."""
    n = int(gpus) if gpus else max(1, int(world_size or 1))
    if vram_gb is not None:
        return Hardware("cuda", int(float(vram_gb) * GiB), n, True, f"GPU with {float(vram_gb):g} GB (--vram_gb)")
    props = _cuda_properties()
    if props is not None:
        name, total, bf16 = props
        return Hardware("cuda", total, n, bf16, name)
    available = _available_system_memory()
    shared = f", shared by {n} ranks" if n > 1 else ""
    return Hardware("cpu", available // n, n, False,
                    f"CPU (no GPU): system memory, {format_bytes(available)} available{shared}")


def usable_bytes(hw):
    fraction = USABLE_FRACTION_GPU if hw.device_type == "cuda" else USABLE_FRACTION_CPU
    return int(hw.bytes_per_device * fraction)


# Dense (not 2:4-sparsity) bf16/fp16 tensor-core FLOP/s with fp32 accumulation, per GPU model and variant,
# each from the vendor's datasheet or architecture whitepaper (which print the sparsity figure as twice this).
# Matched on whole words of torch.cuda.get_device_name() (gpu_model): an H100 PCIe is not an H100 SXM.
PEAK_FLOPS = {
    ("h200", "sxm"): (989.4e12, "NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity (H200 SXM)"),
    ("h200", "nvl"): (835.5e12, "NVIDIA H200 datasheet: BF16 1,671 TFLOPS with sparsity (H200 NVL)"),
    ("h100", "sxm"): (989.4e12, "NVIDIA H100 datasheet: BF16 1,979 TFLOPS with sparsity (H100 SXM)"),
    ("h100", "pcie"): (756.5e12, "NVIDIA H100 datasheet: BF16 1,513 TFLOPS with sparsity (H100 PCIe)"),
    ("h100", "nvl"): (835.5e12, "NVIDIA H100 NVL datasheet: BF16 1,671 TFLOPS with sparsity, per GPU"),
    ("a100", ""): (312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (SXM and PCIe alike)"),
    ("a10", ""): (125e12, "NVIDIA A10 datasheet: BF16 125 TFLOPS dense (250 with sparsity)"),
    ("a10g", ""): (70e12, "AWS A10G (G5): no NVIDIA datasheet; 70 TFLOPS dense bf16 as AWS and NVIDIA quote it "
                          "for G5 instances (approximate)"),
    ("l40s", ""): (362.05e12, "NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity"),
    ("l40", ""): (181.05e12, "NVIDIA L40 datasheet: BF16 362.1 TFLOPS with sparsity"),
    ("l4", ""): (121e12, "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity"),
    ("4090", ""): (165.2e12, "NVIDIA Ada Lovelace whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate "
                             "165.2 TFLOPS dense"),
    ("3090", ""): (71e12, "NVIDIA Ampere GA102 whitepaper, RTX 3090: FP16/BF16 tensor with FP32 accumulate "
                          "71 TFLOPS dense"),
    ("v100", "sxm"): (125e12, "NVIDIA V100 datasheet: tensor performance 125 TFLOPS (SXM2, fp16)"),
    ("v100", "pcie"): (112e12, "NVIDIA V100 datasheet: tensor performance 112 TFLOPS (PCIe, fp16)"),
    ("v100s", "pcie"): (130e12, "NVIDIA V100S datasheet: tensor performance 130 TFLOPS (PCIe, fp16)"),
    ("t4", ""): (65e12, "NVIDIA T4 datasheet: mixed-precision (FP16/FP32) 65 TFLOPS"),
}
# Words of a device name that pick a variant; an H100/H200 without one is the SXM part ("NVIDIA H100 80GB HBM3").
_VARIANT_WORDS = {"pcie": "pcie", "nvl": "nvl", "sxm": "sxm", "sxm2": "sxm", "sxm3": "sxm", "sxm4": "sxm",
                  "sxm5": "sxm", "hbm3": "sxm", "hbm3e": "sxm"}
# Words that name a different part than the table's (an RTX 3090 Ti, a 4090 D, ...): no guess is made.
_OTHER_PART_WORDS = {"ti", "d", "super", "laptop", "mobile", "max", "q"}
_MODELS = {model for model, _ in PEAK_FLOPS}


def gpu_model(name):
    """(model, variant) of a CUDA device name in PEAK_FLOPS's terms, or (None, why not)."""
    words = re.findall(r"[a-z0-9]+", name.lower())
    models = [w for w in words if w in _MODELS]
    if not models:
        return None, f"{name!r} is not in trainer/plan/hardware.py's PEAK_FLOPS table"
    other = [w for w in words if w in _OTHER_PART_WORDS]
    if other:
        return None, f"{name!r} is a variant ({' '.join(other)}) the PEAK_FLOPS table does not list"
    model = models[0]
    variants = {_VARIANT_WORDS[w] for w in words if w in _VARIANT_WORDS}
    known = {v for m, v in PEAK_FLOPS if m == model}
    if known == {""}:
        return model, ""
    if not variants and model in ("h100", "h200"):
        variants = {"sxm"}
    if len(variants) == 1 and variants <= known:
        return model, variants.pop()
    return None, f"{name!r}: cannot tell which {model.upper()} variant ({', '.join(sorted(known))}) it is"


def peak_flops(name=None):
    """(dense 16-bit peak FLOP/s, its source) of this process's GPU, or (None, why there is no MFU)."""
    if name is None:
        import torch
        if not torch.cuda.is_available():
            return None, "no MFU on the CPU (no peak FLOP/s to compare against)"
        name = torch.cuda.get_device_name()
    model, variant = gpu_model(name)
    if model is None:
        return None, f"no MFU: GPU {variant}; add its dense bf16/fp16 FLOP/s with a source"
    return PEAK_FLOPS[(model, variant)]
