"""Where a captured decode step's wall time goes: the GPU's time inside each step, and the gaps between steps.

:func:`step_events` wraps ``mobiquant.tasks.decode._Stepper.step`` so that every decode step that replays a
captured graph is bracketed by two CUDA events on the current stream. After the generation,
:meth:`StepEvents.summary` reads them:

- ``gpu_us``: from a step's first event to its second, the mean over steps: the step's kernels as the GPU
  runs them (the graph's launches and the gaps inside it included, the host's time not);
- ``gap_us``: from a step's second event to the next step's first: the GPU waiting for the host (the token
  pick, the budget's bookkeeping, the next replay's submission), plus the pick's own small kernels.

``gpu_us + gap_us`` is the wall time per token. A step whose ``gpu_us`` is far above the sum of its kernels'
durations (``--profile``) is bound by launches inside the graph; a large ``gap_us`` means the host is late.
"""

from __future__ import annotations

import contextlib
import statistics

import torch


class StepEvents:
    def __init__(self):
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def summary(self) -> dict[str, float]:
        """``{"gpu_us", "gap_us", "steps"}`` (medians over the recorded replay steps; NaN without any)."""
        if not self.pairs:
            return {"gpu_us": float("nan"), "gap_us": float("nan"), "steps": 0}
        torch.cuda.synchronize()
        gpu = [1e3 * a.elapsed_time(b) for a, b in self.pairs]
        gaps = [1e3 * b.elapsed_time(a2) for (_, b), (a2, _) in zip(self.pairs, self.pairs[1:], strict=False)]
        return {
            "gpu_us": statistics.median(gpu),
            "gap_us": statistics.median(gaps) if gaps else float("nan"),
            "gpu_max_us": max(gpu),
            "gap_max_us": max(gaps) if gaps else float("nan"),
            "span_us": 1e3 * self.pairs[0][0].elapsed_time(self.pairs[-1][1]) / len(gpu),
            "steps": len(gpu),
        }


@contextlib.contextmanager
def step_events():
    """Inside the block, every replayed decode step records its two events into the yielded ``StepEvents``
    (capture steps, eager steps and the CPU are not recorded)."""
    from mobiquant.tasks import decode

    rec = StepEvents()
    real = decode._Stepper.step

    def step(self, tok, pos, key):
        if self.mode not in ("graph", "compile") or key not in self.graphs or not torch.cuda.is_available():
            return real(self, tok, pos, key)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = real(self, tok, pos, key)
        b.record()
        rec.pairs.append((a, b))
        return out

    decode._Stepper.step = step
    try:
        yield rec
    finally:
        decode._Stepper.step = real
