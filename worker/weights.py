"""Weight precision for serving (``--weights``): the projection and MLP matrices stored in
fp32, bf16 or int8 while activations, the KV cache, norms, embeddings and the LM head stay
in the model's ``--dtype``.

Why: a decode step at small batch is bound by reading the weights (issue 19: about
540 MB per step in fp32 on the default model), so halving (bf16) or quartering (int8)
their bytes is what speeds up interactive, low-concurrency serving on CPUs.

- ``bf16``: each matrix in bfloat16, multiplied by a bf16-input kernel; an fp32 input is
  split into a bf16 high and low part (stacked rows of one matmul), so activations keep
  about fp32 accuracy and only the weights are rounded.
- ``int4``: weight-only 4-bit with a scale and a zero per group of 32 input columns
  (asymmetric min/max, as GGUF's Q4_1), through PyTorch's int4 weight-pack matmul
  (``torch._weight_int4pack_mm_for_cpu``, vectorised for bf16 inputs: a 1536x576 matrix
  at batch 1 takes 12 us against fp32's 44 us on the 2-core benchmark VM). The default
  model ships as Q4_1, so its fp32 weights are exactly on such a grid: int4 stores them
  again in 4 bits; the kernel's bf16 scales and zeros are given as a high and a low
  part (two calls), so only its bf16 output rounds (issue 19's note has the measured
  quality).
- ``int8``: weight-only int8 with one scale per output channel (symmetric, absmax / 127),
  through PyTorch's own int8 weight-pack matmul (``torch._weight_int8pack_mm``), a
  maintained kernel with a vectorised CPU path for bf16 inputs (its fp32-input path
  is scalar and several times slower, so the input goes in as bf16 parts too). Where
  the kernel is missing (CUDA builds without it), the matrix is dequantised per call,
  which keeps the memory saving and gives up the speed.

:class:`LowPrecisionLinear` subclasses ``nn.Linear`` so that peft wraps it like any
linear layer: a LoRA adapter's delta is computed from the unquantised input with the
adapter's own (trained-precision) weights and added to the base output, per row, as in a
full-precision model (:func:`keep_adapter_precision` undoes peft's cast of an adapter to
its base layer's dtype).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from common.models import WEIGHTS

logger = logging.getLogger(__name__)


# Module names under a decoder layer whose matrices are converted (Llama-style names;
# other architectures keep their weights as loaded).
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LowPrecisionLinear(torch.nn.Linear):
    """A linear layer whose weight is stored in bf16 or int8 (+ per-channel scales)."""

    scales: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, precision: str) -> None:
        torch.nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a new weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.precision = precision
        weight = linear.weight.detach().float().contiguous()
        if precision == "bf16":
            stored = weight.to(torch.bfloat16)
            scales = None
        elif precision == "int8":
            scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            stored = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
            scales = scales.to(torch.bfloat16)
        elif precision == "int4":
            stored, scales = _int4_groups(weight)
        else:
            raise ValueError(f"precision must be bf16, int8 or int4, got {precision!r}")
        self.weight = torch.nn.Parameter(stored.to(linear.weight.device), requires_grad=False)
        self.register_buffer("scales", None if scales is None else scales.to(stored.device))
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if flat.dtype == torch.float32:
            # fp32 activations through a bf16-input kernel without rounding them to bf16:
            # x = hi + lo (each bf16, together ~16 mantissa bits), stacked as the rows of
            # one matmul, so the weights are still read once. Rounding x itself to bf16
            # cost greedy agreement with fp32 (12 prompts: 75% vs 92% keeping fp32's
            # first 16 tokens, bf16 weights).
            hi = flat.to(torch.bfloat16)
            lo = (flat - hi.float()).to(torch.bfloat16)
            y = self._matmul(torch.cat((hi, lo)), rows)
            y = y[:rows].float() + y[rows:].float()
        else:
            y = self._matmul(flat.to(torch.bfloat16), rows).to(x.dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _matmul(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """``x``'s first ``rows`` rows are the (high part of the) input itself."""
        if self.precision == "bf16":
            return F.linear(x, self.weight)
        assert self.scales is not None  # int8 and int4 always have their scales
        if self.precision == "int4":
            return _int4_matmul(x, self.weight, self.scales, rows)
        return _int8_matmul(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.precision}"


def _int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if weight.device.type == "cpu":
        return torch._weight_int8pack_mm(x, weight, scales)
    return F.linear(x, weight.to(x.dtype) * scales[:, None].to(x.dtype))


INT4_GROUP = 32  # input columns per scale/zero pair (GGUF Q4_0/Q4_1 use 32 too)


def int4_fits(linear: torch.nn.Linear) -> bool:
    """The kernel's packing wants whole groups and output channels in sixteens."""
    return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0


def _int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` fp32 → (the kernel's packed 4-bit matrix, ``[2, in/32, out, 2]`` bf16:
    each group's scale and zero as a high and a low bf16 part) with
    ``w ≈ (q - 8) * scale + zero``, ``q`` in 0..15.

    Why two parts: the kernel takes bf16 scales, and rounding them cost greedy agreement
    with fp32 (``benchmarks.precision --prompts 64``, first 16 tokens: 89% with bf16
    scales, 97% with high + low, whose second matmul over the input's rows costs half
    the first; 2-core VM). The zeros round too, but matter less: fixing them alone kept
    88%."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    q = q.reshape(out_features, in_features).to(torch.int32)
    scale_zero = torch.stack((scale.t(), (low + 8 * scale).t()), dim=-1)
    high_part = scale_zero.to(torch.bfloat16)
    low_part = (scale_zero - high_part.float()).to(torch.bfloat16)
    if weight.device.type == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    else:  # no CPU-layout kernel here: keep the codes, dequantised per call
        packed = q.to(torch.uint8)
    return packed, torch.stack((high_part, low_part)).contiguous()


def _int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, rows: int
) -> torch.Tensor:
    """fp32 ``x @ w.T``: every row with the high parts of the scales and zeros, the first
    ``rows`` (the input's high part; its low part times them is below bf16's rounding)
    with the low parts too."""
    if packed.device.type == "cpu":
        y = torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scale_zero[0]).float()
        y[:rows] += torch._weight_int4pack_mm_for_cpu(
            x[:rows], packed, INT4_GROUP, scale_zero[1]
        ).float()
        return y
    exact = scale_zero.float().sum(dim=0)  # [in/32, out, 2]
    scale = exact[..., 0].t().repeat_interleave(INT4_GROUP, dim=1)
    zero = exact[..., 1].t().repeat_interleave(INT4_GROUP, dim=1)
    return F.linear(x.float(), (packed.float() - 8) * scale + zero)


def resolve_weights(requested: str, model_dtype: torch.dtype) -> str:
    """``auto`` -> the precision the weights were loaded in (fp32 on CPU by default,
    bf16 for a bf16/fp16 model); an explicit choice is checked against the model.

    Why not int8 or bf16 by default on CPU: which is fastest differs between machines
    (AVX512-BF16 / AMX or not; issue 19's note has the measurements), so a deployment
    picks it with ``--weights`` after running ``benchmarks/precision.py`` on its hardware.
    """
    if requested not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {requested!r}")
    loaded = "fp32" if model_dtype == torch.float32 else "bf16"
    if requested == "auto":
        return loaded
    if requested == "fp32" and loaded != "fp32":
        raise ValueError(f"--weights fp32 needs --dtype float32 (the model is {model_dtype})")
    return requested


def cpu_features_line() -> str:
    """The CPU flags that decide which low-precision kernels are fast (logged at start)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:
        return "cpu flags unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    present = [f for f in wanted if f in flags]
    return "cpu " + (" ".join(present) if present else "without avx2/avx512/amx")


def convert_weights(model: Any, precision: str) -> int:
    """Re-stores the projection and MLP matrices of ``model`` at ``precision`` (bf16, int8
    or int4; fp32 leaves them), in place; returns how many layers changed."""
    if precision == "fp32":
        return 0
    changed = 0
    for _parent_name, parent in list(model.named_modules()):
        for child_name in _PROJECTIONS:
            child = getattr(parent, child_name, None)
            if type(child) is not torch.nn.Linear:  # exactly Linear: not an already-wrapped one
                continue
            if precision == "int4" and not int4_fits(child):
                logger.info("weights: %s keeps its precision (%dx%d: int4 needs multiples of 16x%d)",
                            child_name, child.out_features, child.in_features, INT4_GROUP)  # fmt: skip
                continue
            setattr(parent, child_name, LowPrecisionLinear(child, precision))
            changed += 1
    logger.info("weights: %d projection/MLP layers stored as %s", changed, precision)
    return changed


def prepare_for_serving(model: Any, requested: str) -> str:
    """What a worker does to a loaded model before serving it (the benchmarks too): on
    CPU, column-major matrices (worker/cpu_layout.py); then the ``--weights`` storage.
    Returns the precision the matrices are stored in."""
    from worker.cpu_layout import use_column_major_linear_weights

    first = next(model.parameters())
    if first.device.type == "cpu":
        use_column_major_linear_weights(model)
    weights = resolve_weights(requested, first.dtype)
    if weights != resolve_weights("auto", first.dtype):
        convert_weights(model, weights)
    return weights


def keep_adapter_precision(model: Any, adapter_key: str, dtype: torch.dtype) -> None:
    """peft casts a loaded adapter to its base layer's weight dtype (bf16 here); put the
    adapter's matrices back in ``dtype`` (the model's compute dtype) so its delta is
    computed as in a full-precision model. int8 bases are left as peft leaves them (it
    casts only to floating dtypes)."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, LowPrecisionLinear):
            continue
        for table_name in ("lora_A", "lora_B"):
            table = getattr(module, table_name, None)
            if table is not None and adapter_key in table:
                table[adapter_key].to(dtype)


def weight_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer: what a decode step reads at most."""
    tensors = [*model.parameters(), *model.buffers()]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
