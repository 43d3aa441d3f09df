"""GPTQ (Frantar et al., 2023) in the MoBiSlice format: one slice of ``bits`` bits per weight.

Follows the reference implementation (github.com/IST-DASLab/gptq):

* blocks are processed sequentially; the inputs of block ``i`` are the outputs of the already
  GPTQ-quantized blocks ``0..i-1`` on the calibration windows;
* inside a block, ``true_sequential`` (default on) quantizes the linears in the order they are called,
  one *stage* per distinct input (LLaMA: q/k/v, o, gate/up, down), re-collecting the Hessian of a stage
  with the earlier stages already quantized;
* ``H = 2 X^T X / N`` over the ``N`` calibration tokens; dead columns (``H_jj = 0``) are zeroed;
  damping ``percdamp * mean(diag H)``; the upper Cholesky factor of ``H^-1`` drives the column sweep,
  with lazy batch updates of ``blocksize`` columns;
* ``act_order`` (desc_act) sweeps the columns by decreasing ``H_jj``, with *static groups*: each group's
  parameters are computed from the original columns of that contiguous group before the sweep, so the
  stored format stays one step/zero point per contiguous group of ``group_size`` input columns. Without
  ``act_order`` the parameters of a group are computed when the sweep reaches its first column, from the
  weights as updated so far (the reference's default).

Group parameters are asymmetric per-group min-max exactly as :func:`mobiquant.quant.primitives.lwc_params`
(no clipping), with the step and zero point rounded to fp16 as stored, so the packed layer reproduces the
GPTQ solution bit for bit. Ragged last groups (``group_size`` not dividing the width) are supported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ...calibration import capture_block_inputs, run_block
from ...nn.linear import MoBiLinear
from ...patching import find_blocks
from ...quant.primitives import check_bits, check_group_size, lwc_params, num_groups
from .common import mark_quantized, pack_linear_from_codes, quantizable_linears, set_submodule

log = logging.getLogger(__name__)
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float32 [out, n_groups], fp16-representable
    zero: torch.Tensor  # float32 [out, n_groups], fp16-representable integers
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """``scale * (codes - zero)`` per group, ``[out, in]`` float32."""
        idx = torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size
        return self.scale[:, idx] * (self.codes.float() - self.zero[:, idx])


class HessianAccumulator:
    """Running ``H = 2 X^T X / N`` over the rows of every input given to :meth:`add`."""

    def __init__(self, columns: int, device=None):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.n == 0:
            raise RuntimeError("no calibration tokens reached this layer: its Hessian is empty")
        return self.sum * (2.0 / self.n)


def _group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max step and integer zero point of the columns ``w`` ``[out, width]``, rounded to fp16."""
    p = lwc_params(w.unsqueeze(1), bits)
    scale = p.scale.reshape(-1).half().float()
    # one-signed narrow groups can have zero points beyond fp16's range: keep them finite, as stored
    zero = p.zero.reshape(-1).clamp(-_FP16_MAX, _FP16_MAX).half().float()
    return scale, zero


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    act_order: bool = True,
    percdamp: float = 0.01,
    blocksize: int = 128,
    cpu_threads: int | None = 1,
) -> GPTQResult:
    """GPTQ of one weight ``[out, in]`` given its input Hessian ``H`` ``[in, in]`` (``2 X^T X / N``).

    ``cpu_threads``: torch intra-op threads for the sweep when it runs on CPU (``None``: leave as is). The
    sweep is thousands of tiny latency-bound ops; with 2 threads on a 2-core machine the column loop
    measured 6x and the Cholesky 35x slower than with 1 thread when other processes share the cores.
    """
    if cpu_threads is not None and weight.device.type == "cpu" and torch.get_num_threads() != cpu_threads:
        before = torch.get_num_threads()
        torch.set_num_threads(cpu_threads)
        try:
            return gptq_quantize_weight(weight, H, bits, group_size, act_order, percdamp, blocksize, None)
        finally:
            torch.set_num_threads(before)
    check_bits(bits)
    check_group_size(group_size)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    W = weight.detach().clone().float()
    out_f, n = W.shape
    if tuple(H.shape) != (n, n):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the weight's {n} input columns")
    H = H.detach().clone().float().to(W.device)
    maxq = 2**bits - 1
    g = group_size
    ng = num_groups(n, g)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scale = torch.zeros(out_f, ng, device=W.device)
    zero = torch.zeros(out_f, ng, device=W.device)
    if act_order:  # static groups from the original (dead-zeroed) columns
        for gi in range(ng):
            scale[:, gi], zero[:, gi] = _group_params(W[:, gi * g : (gi + 1) * g], bits)
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        group_of_col = (perm // g).tolist()
    else:
        perm = None
        group_of_col = [j // g for j in range(n)]

    damp = percdamp * torch.mean(torch.diag(H))
    H[range(n), range(n)] += damp
    try:
        L = torch.linalg.cholesky(H)
    except torch.linalg.LinAlgError:  # pragma: no cover - only for pathological Hessians
        H[range(n), range(n)] += max(float(damp), 1e-6) * 10
        L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)

    Q = torch.zeros(out_f, n, device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            gi = group_of_col[col]
            if not act_order and col % g == 0:
                # the group's columns as updated so far (inside this lazy block: W1; beyond it: W)
                end = min(col + g, n)
                cur = W1[:, i : min(count, end - i1)]
                if end > i2:  # columns past this lazy block, with the block's pending updates applied
                    beyond = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:col, i2:end]
                    cur = torch.cat([cur, beyond], dim=1)
                scale[:, gi], zero[:, gi] = _group_params(cur, bits)
            s, z = scale[:, gi], zero[:, gi]
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            err = (w - s * (q - z)) / d
            Q1[:, i] = q
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(codes=Q.to(torch.uint8), scale=scale, zero=zero, bits=bits, group_size=g)


# ---------------------------------------------------------------------------- model driver
class _StopBlock(Exception):
    pass


@torch.no_grad()
def _input_groups(block: nn.Module, names: list[str], x: torch.Tensor, kwargs: dict[str, Any]) -> list[list[str]]:
    """Groups of linear names that read the very same input tensor, in the order they are first called."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name in names:

        def hook(mod, args, name=name):
            if all(n != name for n, _ in seen):
                seen.append((name, args[0]))

        hooks.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run_block(block, x[:1], kwargs)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if all(n != s for s, _ in seen)]
    if missing:
        raise RuntimeError(f"linears {missing} were never called in a block forward: cannot calibrate them")
    groups: list[list[str]] = []
    tensors: list[torch.Tensor] = []
    for name, t in seen:
        for i, other in enumerate(tensors):
            if other is t:
                groups[i].append(name)
                break
        else:
            groups.append([name])
            tensors.append(t)
    return groups


@torch.no_grad()
def _collect_hessians(
    block: nn.Module,
    groups: list[list[str]],
    x: torch.Tensor,
    kwargs: dict[str, Any],
    batch_size: int,
    stop_after: bool,
) -> dict[str, HessianAccumulator]:
    """Hessians of the linears in ``groups`` on block inputs ``x``; one accumulator per input group.

    With ``stop_after`` the block forward is cut short once every group has been seen.
    """
    accs: dict[str, HessianAccumulator] = {}
    called: set[int] = set()
    hooks = []
    for gi, group in enumerate(groups):
        first = block.get_submodule(group[0])
        acc = HessianAccumulator(first.in_features, device=x.device)
        for name in group:
            accs[name] = acc

        def pre(mod, args, acc=acc, gi=gi):
            acc.add(args[0])
            called.add(gi)

        def post(mod, args, out):
            if stop_after and len(called) == len(groups):
                raise _StopBlock

        hooks.append(first.register_forward_pre_hook(pre))
        hooks.append(block.get_submodule(group[-1]).register_forward_hook(post))
    try:
        for start in range(0, x.shape[0], batch_size):
            called.clear()
            try:
                run_block(block, x[start : start + batch_size], kwargs)
            except _StopBlock:
                pass
    finally:
        for h in hooks:
            h.remove()
    return accs


@torch.no_grad()
def quantize_gptq(
    model: nn.Module,
    calib_ids: torch.Tensor,
    bits: int,
    group_size: int = 128,
    act_order: bool = True,
    percdamp: float = 0.01,
    blocksize: int = 128,
    progress: bool = True,
    true_sequential: bool = True,
    batch_size: int = 8,
    skip: tuple[str, ...] | list[str] = (),
    cpu_threads: int | None = 1,
) -> nn.Module:
    """GPTQ-quantize every block linear of ``model`` in place; returns the model.

    ``calib_ids``: calibration token windows ``[n, T]``. Each block linear becomes a packed ``MoBiLinear``
    with ``slice_bits=(bits,)``; ``model.gptq_report`` lists per-linear reconstruction losses and times.
    ``cpu_threads``: intra-op threads of each weight's column sweep on CPU (see ``gptq_quantize_weight``);
    block forwards keep the process setting.
    """
    check_bits(bits)
    check_group_size(group_size)
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be a non-empty [n, T] tensor of token ids, got {tuple(calib_ids.shape)}")
    t_start = time.perf_counter()
    blocks_name, blocks = find_blocks(model)
    x, kwargs = capture_block_inputs(model, calib_ids)
    report: list[dict] = []
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(blocks), desc=f"GPTQ w{bits} g{group_size}", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    for bi in range(len(blocks)):
        t0 = time.perf_counter()
        block = blocks[bi]
        names = [
            n
            for n, m in quantizable_linears(block, skip, prefix=f"{blocks_name}.{bi}").items()
            if isinstance(m, nn.Linear)
        ]
        groups = _input_groups(block, names, x, kwargs)
        stages = [[g] for g in groups] if true_sequential else [groups]
        for si, stage in enumerate(stages):
            accs = _collect_hessians(block, stage, x, kwargs, batch_size, stop_after=si < len(stages) - 1)
            for name in [n for g in stage for n in g]:
                lin = block.get_submodule(name)
                res = gptq_quantize_weight(
                    lin.weight, accs[name].H, bits, group_size, act_order, percdamp, blocksize, cpu_threads
                )
                with torch.no_grad():
                    diff = lin.weight.float() - res.dequantize()
                    err = float(torch.einsum("oi,ij,oj->", diff, accs[name].H, diff)) / 2.0
                q = pack_linear_from_codes(lin, [res.codes], res.scale, res.zero, (bits,), group_size)
                set_submodule(block, name, q)
                report.append({"block": bi, "linear": name, "out_mse": err / lin.out_features, "tokens": accs[name].n})
            del accs
        outs = [run_block(block, x[s : s + batch_size], kwargs) for s in range(0, x.shape[0], batch_size)]
        x = torch.cat(outs)
        for m in block.modules():
            if isinstance(m, MoBiLinear):
                m.clear_cache()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(block=bi, s=f"{time.perf_counter() - t0:.1f}")
        log.info("GPTQ block %d/%d done in %.1fs", bi + 1, len(blocks), time.perf_counter() - t0)
    if bar is not None:
        bar.close()
    mark_quantized(model, (blocks_name, blocks), (bits,), group_size, method="gptq", skip=skip)
    model.gptq_report = report
    model.gptq_settings = {
        "bits": bits,
        "group_size": group_size,
        "act_order": act_order,
        "percdamp": percdamp,
        "blocksize": blocksize,
        "true_sequential": true_sequential,
        "calib_windows": int(calib_ids.shape[0]),
        "calib_seqlen": int(calib_ids.shape[1]),
        "seconds": time.perf_counter() - t_start,
    }
    return model


__all__ = ["GPTQResult", "HessianAccumulator", "gptq_quantize_weight", "quantize_gptq"]
