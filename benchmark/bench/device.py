"""What the device is, what it could do, and how much arithmetic a piece of code asks of it.

* :func:`bf16_peak` — the dense bf16 tensor-core peak of a known GPU, from the vendors' data
  sheets (:data:`BF16_DENSE_PEAK_TFLOPS`); an unknown device has no peak, and every ratio to
  the peak is then left out rather than guessed.
* :func:`count_flops` — the floating-point operations of one call, counted by torch's own
  :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and
  attention; element-wise work is not counted, as is usual for "model FLOPs").
* :func:`synchronize` — wait for the device, so that a wall-clock reading covers the work
  that was launched before it (CUDA runs kernels asynchronously).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, matched in this order against
# torch.cuda.get_device_name(). Sources (vendor data sheets; the sheets print the sparse
# figure, twice these, with an asterisk):
#   H200 SXM: NVIDIA H200 Tensor Core GPU datasheet (same GH100 compute as H100 SXM), 989.
#   H100 SXM: NVIDIA H100 Tensor Core GPU datasheet, "BFLOAT16 Tensor Core 1,979 TFLOPS*"
#             (sparse) -> 989; H100 PCIe: 1,513* -> 756.
#   A100 (SXM4 and PCIe): NVIDIA A100 Tensor Core GPU datasheet, "BFLOAT16 Tensor Core 312 TFLOPS".
#   L40S: NVIDIA L40S datasheet, "BFLOAT16 Tensor Core 362.05 | 733*".
#   RTX 4090: NVIDIA Ada Lovelace architecture whitepaper, "Peak BF16 Tensor TFLOPS with FP32
#             Accumulate 165.2 | 330.4*".
# Each entry: (substrings that must all occur in the lower-cased name, substrings that must not, peak, label).
BF16_DENSE_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], tuple[str, ...], float, str], ...] = (
    (("h200",), ("nvl",), 989.0, "H200 SXM"),
    (("h100", "pcie"), (), 756.0, "H100 PCIe"),
    (("h100",), ("nvl", "pcie"), 989.0, "H100 SXM"),
    (("a100",), (), 312.0, "A100"),
    (("l40s",), (), 362.0, "L40S"),
    (("rtx 4090",), (), 165.0, "RTX 4090"),
)


def bf16_peak(device_name: str) -> tuple[float | None, str | None]:
    """``(dense bf16 peak in TFLOP/s, matched label)`` for a CUDA device name, ``(None, None)``
    when the device is not in :data:`BF16_DENSE_PEAK_TFLOPS` (CPUs included)."""
    name = device_name.lower()
    for must, must_not, peak, label in BF16_DENSE_PEAK_TFLOPS:
        if all(part in name for part in must) and not any(part in name for part in must_not):
            return peak, label
    return None, None


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` as torch's ``FlopCounterMode`` counts them (one
    multiply-add = 2 operations; a backward run inside ``fn`` is counted too), plus the
    attention kernels torch's table leaves out (:func:`_extra_formulas`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def _extra_formulas() -> dict:
    """FLOP formulas for two attention kernels that torch's counter (torch/utils/flop_counter.py)
    has no entry for, so that a CPU count matches a GPU one:

    * ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward): what
      ``F.scaled_dot_product_attention`` runs on the CPU; counted with torch's own SDPA
      formulas (``sdpa_flop_count``, ``sdpa_backward_flop_count``), as the GPU kernels are;
    * ``_native_multi_head_attention``: the fused kernel ``nn.MultiheadAttention`` takes in
      inference (no grad), which open_clip's blocks call: the q, k, v and output projections
      (``2 * tokens * D * D`` each) and the two attention products (``2 * B * L * S * D`` each).

    A formula receives the shapes of the op's tensor arguments (torch's ``shape_wrapper``)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    def native_mha(query, key, value, *args, out_shape=None, **kwargs) -> int:
        batch, length, width = query  # [B, L, D]: batch first (nn.MultiheadAttention transposes before)
        source = key[1]
        projections = 2 * batch * width * width * (2 * length + 2 * source)  # q and output: L rows; k, v: S rows
        return projections + 2 * 2 * batch * length * source * width

    return {aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_backward,
            aten._native_multi_head_attention: native_mha}


def synchronize(device: torch.device) -> None:
    """Block until every kernel launched on ``device`` has finished (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_facts(device: torch.device) -> dict[str, object]:
    """The machine a bench ran on: the harness's provenance (versions, git, host, device name,
    torch threads) plus CPU cores, and on CUDA the device's memory, capability and known peak."""
    from ..provenance import provenance

    facts = dict(provenance(device))
    facts["cpu_cores"] = os.cpu_count()
    try:
        facts["cpu_cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        facts["cpu_cores_usable"] = os.cpu_count()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["cuda_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
        facts["cuda_capability"] = f"{props.major}.{props.minor}"
        facts["cuda_multiprocessors"] = props.multi_processor_count
    return facts
