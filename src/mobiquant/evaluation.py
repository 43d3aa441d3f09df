"""Perplexity under the GPTQ/OmniQuant protocol, for any Hugging Face causal language model.

The text is tokenized once and cut into non-overlapping windows (:func:`mobiquant.io.data.eval_windows`).
Each window is scored on its own, with no context carried over from the previous one: the model sees
tokens ``0..seqlen-2`` and is scored on predicting tokens ``1..seqlen-1``. The perplexity is
``exp(mean token NLL)`` over all scored tokens of all windows. (GPTQ writes this as
``exp(sum_w mean_nll_w * seqlen / (n * seqlen))``; every window scores the same number of tokens, so the
two are the same number.)

Nothing here looks inside the model: quantized models whose ``nn.Linear`` layers were replaced by custom
modules are evaluated the same way, as long as ``model(input_ids=...)`` returns logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["model_device", "perplexity", "window_nll"]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model that has neither."""
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        if isinstance(output, (tuple, list)):
            logits = output[0]
        elif isinstance(output, torch.Tensor):
            logits = output
        else:
            raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}")
    return logits


def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window (``float64[batch]``), each scored on tokens ``1..seqlen-1``.

    The cross-entropy is computed in float32 from the model's logits (whatever the model's dtype), one
    window at a time so that only one window's float32 logits exist at once.
    """
    logits = _logits(model(input_ids=windows, use_cache=False))
    sums = torch.empty(windows.shape[0], dtype=torch.float64)
    for row in range(windows.shape[0]):
        shift_logits = logits[row, :-1, :].float()
        shift_labels = windows[row, 1:].to(shift_logits.device)
        sums[row] = F.cross_entropy(shift_logits, shift_labels, reduction="sum").double().cpu()
    return sums


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool | str | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on evaluation windows (GPTQ/OmniQuant protocol).

    Args:
        model: a causal LM called as ``model(input_ids=..., use_cache=False)``, returning ``.logits`` (or
            a tuple whose first item is the logits) of shape ``[batch, seqlen, vocab]``.
        windows: ``LongTensor[n, seqlen]`` from :func:`mobiquant.io.data.eval_windows`.
        batch_size: windows per forward pass.
        device: where to run; by default the device of the model's parameters (the model is not moved).
        progress: ``True`` or a description string shows a tqdm progress bar.

    Returns:
        ``{"ppl", "nll", "n_tokens", "n_windows", "seqlen", "dtype", "window_nll"}``: ``nll`` is the mean
        token NLL in nats, ``n_tokens = n_windows * (seqlen - 1)`` the number of scored tokens, ``dtype`` the
        dtype of the model's parameters, ``window_nll`` each window's summed NLL (``seqlen - 1`` tokens each,
        in window order: what a perplexity over a subset of the windows, or a paired comparison, needs).
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be a 2-D LongTensor [n, seqlen], got shape {tuple(windows.shape)}")
    n_windows, seqlen = windows.shape
    if n_windows == 0:
        raise ValueError("No windows to evaluate")
    if seqlen < 2:
        raise ValueError(f"Windows of seqlen={seqlen} score no token; use seqlen >= 2")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device) if device is not None else model_device(model)
    windows = windows.long()
    param = next(model.parameters(), None)
    dtype = str(param.dtype).removeprefix("torch.") if param is not None else None

    batches = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        desc = progress if isinstance(progress, str) else "perplexity"
        batches = tqdm(batches, desc=desc, unit="batch", total=math.ceil(n_windows / batch_size))

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    per_window: list[float] = []
    try:
        with torch.inference_mode():
            for start in batches:
                batch = windows[start : start + batch_size].to(device)
                sums = window_nll(model, batch)
                total += sums.sum()
                per_window += sums.tolist()
    finally:
        model.train(was_training)

    n_tokens = n_windows * (seqlen - 1)
    nll = total.item() / n_tokens
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "n_tokens": n_tokens,
        "n_windows": n_windows,
        "seqlen": seqlen,
        "dtype": dtype,
        "window_nll": per_window,
    }
