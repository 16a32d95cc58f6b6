"""What this machine's processor and accelerator can run well, and the defaults that follow.

`precision: auto` and `data.channels_last: auto` are resolved here, on the worker that trains (on
a cluster the driver's CPU says nothing about the GPU nodes'). The rules come from measurements
(bench/model.py, bench/train.py; figures in bench/RESULTS.md):

- bf16 autocast is 1.8x faster than fp32 on a CPU with native bf16 (avx512_bf16 / AMX) and 3-4x
  slower on one without (oneDNN emulates it there): bf16 where the CPU or GPU has it, else fp32
  (fp16 with a GradScaler on a GPU without bf16).
- channels_last is always right on CUDA. On a CPU whose oneDNN takes the AVX-512 path, the fp32
  backward of a 1x1 stride-2 convolution in NHWC segfaults (oneDNN 3.12,
  jit_avx512_common_1x1_convolution_bwd_weights; iResNet's downsample convs are exactly that), so
  `auto` never picks it there and an explicit `true` with fp32 is refused.

`ONEDNN_MAX_CPU_ISA` caps the kernels oneDNN may use; a cap below AVX-512 (e.g. AVX2) makes an
AVX-512 machine take the other CPUs' path, and the rules here follow the cap.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ranray.config import ConfigError

# oneDNN's ISA names, weakest first (ONEDNN_MAX_CPU_ISA takes one of them, or ALL).
_ISA_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
              "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
              "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL")
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")


class HardwareError(ConfigError):
    """A setting this machine cannot run; the message names the config key."""


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    isa_cap: str  # ONEDNN_MAX_CPU_ISA, upper-cased; "" when unset

    def _allowed(self, isa: str) -> bool:
        if not self.isa_cap or self.isa_cap not in _ISA_ORDER:
            return True
        return _ISA_ORDER.index(isa) <= _ISA_ORDER.index(self.isa_cap)

    @property
    def avx512(self) -> bool:
        """oneDNN runs its AVX-512 kernels here (the CPU has them and no cap forbids them)."""
        return "avx512f" in self.flags and self._allowed("AVX512_CORE")

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix instructions (avx512_bf16 or AMX) that oneDNN may use."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags) and self._allowed("AVX512_CORE_BF16")

    def describe(self) -> str:
        have = [f for f in FLAGS_THAT_MATTER if f in self.flags] or ["none of " + ", ".join(FLAGS_THAT_MATTER)]
        cap = f"; ONEDNN_MAX_CPU_ISA={self.isa_cap}" if self.isa_cap else ""
        return (f"{self.model}: {' '.join(have)}{cap} -> AVX-512 path {'yes' if self.avx512 else 'no'}, "
                f"native bf16 {'yes' if self.native_bf16 else 'no'}")


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    model, flags = platform.processor() or "unknown CPU", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
                break
    except OSError:
        pass  # not Linux: no flags known, so the conservative choices (fp32, contiguous) apply
    return CpuInfo(model, flags, os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper())


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> the fastest safe precision on `device`; anything else is returned as asked."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_info().native_bf16 else "fp32"


def resolve_channels_last(requested: bool | str, device: torch.device, precision: str) -> bool:
    """'auto' -> NHWC where it is known good (CUDA; CPUs off the AVX-512 path); True is refused
    where it is known to crash (fp32 backward on the AVX-512 path)."""
    if device.type == "cuda":
        return requested in ("auto", True)
    crashes = cpu_info().avx512 and precision == "fp32"
    if requested == "auto":
        return not cpu_info().avx512
    if requested is True and crashes:
        raise HardwareError(
            "config key 'data.channels_last': true with fp32 on this CPU segfaults in oneDNN's AVX-512 1x1 "
            "convolution backward (oneDNN " + onednn_version() + "); use data.channels_last=auto or false, "
            "precision=bf16, or run with ONEDNN_MAX_CPU_ISA=AVX2")
    return bool(requested)


def check_cpu_settings(precision: str, channels_last: bool | str, use_gpu: bool) -> None:
    """Preflight for CPU jobs: refuse what resolve_channels_last would refuse in the workers (on a
    CPU cluster the driver's CPU stands for the workers'; the workers check again)."""
    if not use_gpu:
        cpu = torch.device("cpu")
        resolve_channels_last(channels_last, cpu, resolve_precision(precision, cpu))


def onednn_version() -> str:
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            return line.split("v", 1)[-1].split()[0] if " v" in line else line.strip()
    return "unknown"


def describe() -> list[tuple[str, str]]:
    """Rows for `ranray version`: the CPU features and library versions that decide the defaults."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [("cpu", cpu_info().describe()),
            ("torch", f"{torch.__version__} (oneDNN {onednn_version()}, "
                      f"CPU capability {torch.backends.cpu.get_cpu_capability()})")]
    if device.type == "cuda":
        rows.append(("gpu", f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"))
    precision = resolve_precision("auto", device)
    rows.append(("auto choices", f"on {device.type}: precision {precision}, channels_last "
                                 f"{resolve_channels_last('auto', device, precision)}"))
    return rows
