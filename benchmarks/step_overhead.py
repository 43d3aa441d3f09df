"""Where a decode step of the package's 8B-shaped model spends its time outside the linears (GPU).

The 4 LLaMA-3-8B-shaped layers of ``decode_bench.py``'s package rows (vocabulary 1024), fp16: the kernels of one
eager decode step (``e2e_decode.step_profile``: count and GPU time per kernel, the top 25), then the wall time per
token of ``mobiquant.tasks.decode.generate`` with the step captured as one CUDA graph (``cuda_graph='graph'``) and
with ``torch.compile(mode='reduce-overhead')`` (``'compile'``), in the same run.

    python3 benchmarks/step_overhead.py [--layers 4] [--new-tokens 64] [--top 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=25, help="kernels listed, by GPU time")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_overhead.py needs a CUDA device")
    from transformers import LlamaConfig, LlamaForCausalLM

    from decode_bench import FF, KV, D, load_kernels

    load_kernels()  # puts src/ on the path
    import e2e_decode
    from mobiquant.tasks.decode import generate
    from step_timing import step_events

    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32 * KV // D,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        fp = LlamaForCausalLM(cfg).half().eval()
    fp.requires_grad_(False)
    prompt = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(7)).cuda()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.layers} 8B-shaped layers, fp16")
    e2e_decode.step_profile(fp, None, "cuda", prompt, None, "fp16 eager step", top=args.top)
    for mode in ("graph", "compile"):
        try:
            generate(fp, prompt, 8, cuda_graph=mode)  # capture or compile
            with step_events() as ev:
                g = generate(fp, prompt, args.new_tokens, cuda_graph=mode)
            s = ev.summary()
            print(f"fp16 cuda_graph={mode}: {g.us_per_token:.1f} us/token (GPU {s['gpu_us']:.1f} us a step; {g.graph})")
        except Exception as e:  # report, keep the other mode's row
            print(f"fp16 cuda_graph={mode}: failed: {type(e).__name__}: {str(e).strip()[:300]}")


if __name__ == "__main__":
    main()
