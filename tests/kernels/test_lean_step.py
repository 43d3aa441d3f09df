"""The lean decode step (``patching.lean_step``): the one-launch decode attention (rotary embedding, cache write,
attention; ``kernels.triton_attention``) and the residual adds in the o and down launches: in Triton's interpreter
on the CPU, on the GPU where there is one."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from mobiquant.kernels import available
from mobiquant.kernels import triton_attention as ta
from mobiquant.nn.fused import linear_add
from mobiquant.patching import lean_step
from mobiquant.tasks.decode import generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import build_tiny_llama, build_tiny_opt  # noqa: E402

needs_triton = pytest.mark.skipif(not available(), reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _step(B, H, KVH, D, L, pos, masked, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEV, dtype)

    ang = torch.randn(B, D // 2, generator=g)
    cos = torch.cat([ang.cos()] * 2, -1).to(DEV, dtype)
    sin = torch.cat([ang.sin()] * 2, -1).to(DEV, dtype)
    mask = (torch.rand(B, 1, 1, L, generator=g) > 0.3).to(DEV) if masked else None
    return dict(q=r(B, H * D), k=r(B, KVH * D), v=r(B, KVH * D), cos=cos, sin=sin, keys=r(B, KVH, L, D),
                values=r(B, KVH, L, D), offset=torch.tensor(pos, device=DEV), mask=mask)  # fmt: skip


@needs_triton
@pytest.mark.parametrize(
    "B,H,KVH,D,L,pos,masked",
    [
        (1, 4, 2, 16, 40, 0, False),  # the first position: the token attends to itself alone
        (1, 4, 2, 16, 40, 33, False),  # past one block of positions
        (1, 4, 4, 8, 20, 19, False),  # no grouping, the last slot
        (2, 6, 3, 8, 70, 65, True),  # two rows, a mask
        (1, 9, 3, 64, 100, 37, True),  # SmolLM2's heads
    ],
)
@pytest.mark.parametrize(
    "split,block_n,pdl,combine",
    [(None, None, False, None), (None, 16, False, None), (16, 8, False, None), (None, None, True, None),
     (16, 8, True, None), (16, 8, False, "last"), (16, 8, True, "last")],
)  # fmt: skip
def test_decode_attention_matches_the_reference(B, H, KVH, D, L, pos, masked, split, block_n, pdl, combine):
    """Output, the written cache slot and the advanced offset equal the PyTorch reference; the ticket is left at 0.
    ``block_n`` None: the default positions a loop step (one step for these caches), 16: several steps; with
    ``split``, the positions split over programs of 16 each and a second launch combining them (``combine`` "last":
    the last split of each head, whose tickets are left at 0); with ``pdl``
    launched with programmatic dependent launch (on a GPU of compute capability 9.0+; elsewhere the same code
    without the instructions)."""
    if pdl and DEV == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    a = _step(B, H, KVH, D, L, pos, masked)
    b = {n: (t.clone() if torch.is_tensor(t) else t) for n, t in a.items()}
    ticket = torch.zeros((), dtype=torch.int32, device=DEV)
    kw: dict = dict(pdl=pdl, combine=combine)
    if split is not None:
        kw.update(split_positions=split, split_above=0)
    if block_n is not None:
        kw.update(block_n=block_n)
    got = ta.decode_attention(**a, ticket=ticket, scale=D**-0.5, **kw)
    ref = ta.decode_attention(**b, ticket=None, scale=D**-0.5, backend="torch")
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(a["keys"], b["keys"], atol=1e-3, rtol=0)
    assert torch.equal(a["values"], b["values"])
    assert int(a["offset"]) == int(b["offset"]) == pos + 1
    assert int(ticket) == 0
    if combine == "last":
        assert not ta._head_tickets(torch.device(DEV), B * H).any()


@needs_triton
@pytest.mark.parametrize("split,scaling,dtype", [(None, 1.0, torch.float16), (16, 0.7, torch.float32)])
def test_decode_attention_makes_the_rotary_table_from_the_offset(split, scaling, dtype):
    """``rope=(inv_freq, scaling)``: the launch makes cos and sin from the offset as a Hugging Face LLaMA rotary
    embedding makes them from the position (``rope_from_offset`` equals the model's module exactly), and its output,
    cache slot and offset equal those of the launch handed that cos and sin."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = build_tiny_llama()
    rot = LlamaRotaryEmbedding(config=model.config).to(DEV)
    D = model.config.hidden_size // model.config.num_attention_heads
    B, H, KVH, L, pos = 2, 4, 2, 70, 57
    a = _step(B, H, KVH, D, L, pos, True, dtype=dtype)
    x = torch.zeros(1, 1, D, dtype=dtype, device=DEV)
    cos, sin = rot(x, torch.tensor([[pos]], device=DEV))
    mine = ta.rope_from_offset(rot.inv_freq, rot.attention_scaling, a["offset"], dtype)
    assert torch.equal(mine[0], cos.reshape(1, D)) and torch.equal(mine[1], sin.reshape(1, D))
    c, sn = (t * scaling / rot.attention_scaling for t in ta.rope_from_offset(rot.inv_freq, 1.0, a["offset"],
                                                                                torch.float32))  # fmt: skip
    b = {n: (t.clone() if torch.is_tensor(t) else t) for n, t in a.items()}
    kw: dict = dict(split_positions=split, split_above=0) if split else {}
    t1, t2 = (torch.zeros((), dtype=torch.int32, device=DEV) for _ in range(2))
    made = ta.decode_attention(**dict(a, cos=None, sin=None), ticket=t1, scale=D**-0.5,
                               rope=(rot.inv_freq, scaling), **kw)  # fmt: skip
    handed = ta.decode_attention(**dict(b, cos=c.to(dtype), sin=sn.to(dtype)), ticket=t2, scale=D**-0.5, **kw)
    torch.testing.assert_close(made, handed, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)
    torch.testing.assert_close(a["keys"], b["keys"], atol=2e-3, rtol=0)
    assert int(a["offset"]) == int(b["offset"]) == pos + 1
    ref = ta.decode_attention(**dict(b, cos=None, sin=None, offset=torch.tensor(pos, device=DEV)), ticket=None,
                              scale=D**-0.5, backend="torch", rope=(rot.inv_freq, scaling))  # fmt: skip
    torch.testing.assert_close(made.float(), ref.float(), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="give cos and sin, or rope"):
        ta.decode_attention(**a, ticket=t1, scale=1.0, rope=(rot.inv_freq, 1.0))
    with pytest.raises(ValueError, match="inv_freq must be fp32"):
        ta.decode_attention(**dict(a, cos=None, sin=None), ticket=t1, scale=1.0, rope=(rot.inv_freq.half(), 1.0))


@needs_triton
def test_decode_attention_steps_through_the_cache():
    """Positions 0..n-1 one launch after another against one reference cache (each step reads the slots the
    earlier ones wrote); a masked-out row reads zeros."""
    B, H, KVH, D, L = 1, 4, 2, 16, 12
    a = _step(B, H, KVH, D, L, 0, False, dtype=torch.float32)
    keys, values = torch.zeros_like(a["keys"]), torch.zeros_like(a["values"])
    rk, rv = keys.clone(), values.clone()
    off, roff = a["offset"].clone(), a["offset"].clone()
    ticket = torch.zeros((), dtype=torch.int32, device=DEV)
    for i in range(L):
        s = _step(B, H, KVH, D, L, 0, False, dtype=torch.float32, seed=i + 1)
        args = dict(q=s["q"], k=s["k"], v=s["v"], cos=s["cos"], sin=s["sin"])
        got = ta.decode_attention(**args, keys=keys, values=values, offset=off, ticket=ticket, scale=0.25,
                                  split_positions=4, split_above=0, block_n=2)  # three splits, some empty  # fmt: skip
        ref = ta.decode_attention(**args, keys=rk, values=rv, offset=roff, ticket=None, scale=0.25, backend="torch")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert int(off) == L
    none = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=DEV)
    off.zero_()
    out = ta.decode_attention(**args, keys=keys, values=values, offset=off, ticket=ticket, scale=0.25, mask=none)
    assert torch.equal(out, torch.zeros_like(out))


@needs_triton
def test_decode_attention_refuses_what_it_cannot_serve():
    a = _step(1, 4, 2, 16, 8, 0, False)
    t = torch.zeros((), dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=r"k \(1, 16\).*expected \[B, H\*D\]"):
        ta.decode_attention(**dict(a, k=a["k"][:, :16]), ticket=t, scale=1.0)
    with pytest.raises(ValueError, match="mask must be bool"):
        ta.decode_attention(**dict(a, mask=torch.ones(1, 1, 1, 8, device=DEV)), ticket=t, scale=1.0)
    with pytest.raises(ValueError, match="cos / sin must hold"):
        ta.decode_attention(**dict(a, cos=a["cos"][:, :8], sin=a["sin"][:, :8]), ticket=t, scale=1.0)
    assert "power of two" in ta.supported(48, 4, 2)
    assert "multiple" in ta.supported(16, 6, 4)
    assert ta.supported(64, 9, 3) is None


def _launches(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = ta.decode_attention

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ta, "decode_attention", counted)
    return calls


@needs_triton
@pytest.mark.parametrize("dtype,adds", [(torch.float32, True), (torch.float16, True), (torch.float32, False)])
def test_lean_step_decodes_as_the_model_does(monkeypatch, dtype, adds):
    """A tiny LLaMA with the lean step (with and without its residual adds): the same greedy tokens as its own
    forward, and each decode step one attention launch a layer (the prompt's prefill none); ``enable=False`` puts
    the model's own classes back."""
    model = build_tiny_llama().to(DEV, dtype)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    ref = generate(model, prompt, 10, cuda_graph="off")
    own, own_layer = type(model.model.layers[0].self_attn), type(model.model.layers[0])
    keys = set(model.state_dict())
    assert lean_step(model, adds=adds) == model.config.num_hidden_layers
    assert (type(model.model.layers[0]) is not own_layer) == adds
    assert set(model.state_dict()) == keys  # the ticket is not saved
    calls = _launches(monkeypatch)
    got = generate(model, prompt, 10, cuda_graph="off")
    assert torch.equal(got.tokens, ref.tokens)
    assert len(calls) == 9 * model.config.num_hidden_layers
    assert lean_step(model, enable=False) == 0
    assert type(model.model.layers[0].self_attn) is own and type(model.model.layers[0]) is own_layer


def _combine_launches(monkeypatch) -> list:
    """The grids of the split attention's combining launches from now on."""
    grids: list = []
    real = ta._combine_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(ta, "_combine_kernel", Spy())
    return grids


def _cached_logits(model, ids, prefill: int, max_len: int, spy=None) -> list[torch.Tensor]:
    """The logits of each one-token step after a ``prefill``-token prompt through a static cache (``spy``: a
    context entered around the steps, not the prefill)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():
        model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True)
        with spy() if spy is not None else contextlib.nullcontext():
            return [model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits
                    for i in range(prefill, ids.shape[1])]  # fmt: skip


@needs_triton
def test_lean_step_in_the_compiled_step(monkeypatch):
    """``cuda_graph='compile'`` (on the CPU compiled, not captured; in the interpreter the lean launches run there
    too, outside the compiled code): the lean model's greedy tokens are the model's own."""
    model = build_tiny_llama().to(DEV)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(6))
    ref = generate(model, prompt, 6, cuda_graph="compile")
    lean_step(model)
    calls = _launches(monkeypatch)
    got = generate(model, prompt, 6, cuda_graph="compile")
    lean_step(model, enable=False)
    assert torch.equal(got.tokens, ref.tokens)
    assert len(calls) >= 5 * model.config.num_hidden_layers


@needs_triton
def test_lean_step_keeps_the_logits_step_by_step():
    """Logits of every decode step against the model's own attention over the same static cache."""
    model = build_tiny_llama(num_attention_heads=4, num_key_value_heads=1).to(DEV)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEV)
    outs = []
    for lean in (False, True):
        lean_step(model, enable=lean)
        outs.append(_cached_logits(model, ids, 5, 12))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def _logits_each_way(q, k, ids, prefill, spied, ways) -> list[torch.Tensor]:
    """The packed model ``q``'s step-by-step logits (:func:`_cached_logits`, ``spied``) at the static view ``k`` (None:
    budget 4.5, where its routers decide), once with ``lean_step(q, **way)`` for each of ``ways``; the model's own
    forwards put back after."""
    import mobiquant as mq

    if k is None:
        mq.set_budget(q, 4.5)
    else:
        mq.set_static(q, k)
    outs = []
    for way in ways:
        lean_step(q, **way)
        outs.append(_cached_logits(q, ids, prefill, 10, spied)[0])
    lean_step(q, enable=False)
    return outs


@needs_triton
def test_lean_step_adds_the_residuals_in_the_packed_launches(monkeypatch):
    """A packed tiny LLaMA (fused sites and inputs) decodes one token per step on the one-bit plane kernel: with the
    lean step its o and down launches take the residual as their bias (no addition after them) and its logits stay
    those of its own forward, static and routed."""
    from test_fused_inputs import default_layout_model  # the tiny LLaMA, default layout, calibrated routers

    from mobiquant import kernels
    from mobiquant.patching import fuse_inputs

    q = default_layout_model("site")
    fuse_inputs(q)
    ids = torch.randint(0, q.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2)).to(q.device)
    biased: list[int] = []
    real = kernels.bitplane_linear

    def spy(*a, **k):
        bias = a[7] if len(a) > 7 else k.get("bias")
        biased.append(bias is not None)
        return real(*a, **k)

    @contextlib.contextmanager
    def spied():
        biased.clear()
        monkeypatch.setattr(kernels, "bitplane_linear", spy)
        yield
        monkeypatch.setattr(kernels, "bitplane_linear", real)

    for k in (2, None):  # a static view, then routers where the tokens decide
        outs = _logits_each_way(q, k, ids, 6, spied, [dict(enable=False), dict(enable=True)])
        torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
        # o and down of every layer (q/k/v and gate/up: one site launch each, without a residual)
        assert biased == [True] * 2 * q.config.num_hidden_layers


@needs_triton
@pytest.mark.parametrize("pdl,combine", [(False, "launch"), (True, "launch"), (True, "last")])
def test_lean_step_splits_long_caches(monkeypatch, pdl, combine):
    """A static cache of more than ``SPLIT_ABOVE`` positions takes the split launch and its combining one (the
    module's defaults made small: 2 positions a loop step, splits of 4 past 8 positions), with the logits of the
    model's own forward; a cache of at most ``SPLIT_ABOVE`` positions one launch a layer. ``pdl``: both launches
    with programmatic dependent launch (on a GPU of compute capability 9.0+; elsewhere the same code without the
    instructions), as where the o launch has it. ``combine`` "last" (``SPLIT_COMBINE``): no combining launch, the last
    split of each head combines."""
    from mobiquant.nn import lean

    if pdl and DEV == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    model = build_tiny_llama().to(DEV)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4)).to(DEV)
    ref = _cached_logits(model, ids, 3, 14)
    lean_step(model)
    monkeypatch.setattr(lean, "_o_launch_pdl", lambda *a, **k: pdl)
    for name, val in (("BLOCK_N", 2), ("SPLIT_POSITIONS", 4), ("SPLIT_ABOVE", 8), ("SPLIT_COMBINE", combine)):
        monkeypatch.setattr(ta, name, val)
    combines = _combine_launches(monkeypatch)
    calls = _launches(monkeypatch)
    got = _cached_logits(model, ids, 3, 14)
    lean_step(model, enable=False)
    steps, layers = ids.shape[1] - 3, model.config.num_hidden_layers
    assert len(calls) == steps * layers  # 14 positions: four splits a query head, then combined
    assert len(combines) == (steps * layers if combine == "launch" else 0)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    lean_step(model)
    calls.clear(), combines.clear()
    _cached_logits(model, ids[:, :8], 3, 8)
    assert len(calls) == 5 * layers and not combines  # 8 positions: one launch a layer


_OFFLINE_SPLIT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import offline_sass as osx
from mobiquant.kernels import triton_attention as ta
B, H, KVH, D, L = 1, 32, 8, 128, 2048  # LLaMA-3-8B's heads, a cache of 2048 positions
h = lambda *s: torch.zeros(*s, dtype=torch.float16)
a = dict(q=h(B, H * D), k=h(B, KVH * D), v=h(B, KVH * D), cos=h(1, D), sin=h(1, D), keys=h(B, KVH, L, D),
         values=h(B, KVH, L, D), offset=torch.tensor(5), ticket=torch.zeros((), dtype=torch.int32), scale=0.1, pdl=True)
for name, other, comb in (("_decode_attention_kernel", "_combine_kernel", "launch"),
                          ("_combine_kernel", "_decode_attention_kernel", "launch"),
                          ("_decode_attention_kernel", "_combine_kernel", "last")):
    fn, grid, args, kw = osx._recorded(ta, name, lambda: ta.decode_attention(**a, combine=comb), skip=(other,))
    sass, _ = osx.sass_and_resources(osx.compile_sm90(fn, args, kw))
    ops = [m.group(3) for m in osx.LINE.finditer(sass)]
    wait = ops.index("ACQBULK")
    first = min(i for i, o in enumerate(ops) if o.startswith("LDG"))
    atoms = sum(o.startswith(("ATOMG", "RED")) for o in ops)
    print("RESULT", name + "_" + comb, grid[1] if len(grid) > 1 else 1, ops.index("PREEXIT") < wait < first,
          ops.count("ACQBULK"), atoms)
"""


def test_split_attention_with_pdl_compiles_for_sm90_offline():
    """Compiled for sm_90 without a GPU, a 2048-position cache of LLaMA-3-8B's heads with ``pdl``: the split launch
    (16 splits of the default 128 positions) and the combining launch each let the next kernel start
    (``griddepcontrol.launch_dependents``, SASS ``PREEXIT``), then wait once for the kernel before
    (``griddepcontrol.wait``, ``ACQBULK``) before their first load; with ``combine="last"`` the split launch compiles
    with its tickets (two atomics) the same way."""
    from test_gluon_fragment import run_offline

    got = run_offline(_OFFLINE_SPLIT)
    assert got["_decode_attention_kernel_launch"][:3] == ["16", "True", "1"]
    assert got["_combine_kernel_launch"][:3] == ["1", "True", "1"]
    # combine="last": the same launch, with the head's ticket and the launch's (the last head advancing the offset)
    last = got["_decode_attention_kernel_last"]
    assert last[:3] == ["16", "True", "1"] and int(last[3]) >= 2, got


@needs_triton
def test_lean_step_makes_the_rotary_table_in_the_launch(monkeypatch):
    """``decode.ROPE_IN_LAUNCH``: while ``generate`` decodes, the lean attention launches make cos and sin from the
    cache's offset and the model's ``inv_freq`` (handed none), with the model's own greedy tokens, eager and compiled;
    outside ``generate`` they take the model's. A model cast to fp16 casts ``inv_freq`` too: the launch reads it in
    fp32, converted once. Dynamic rope types are left to the model."""
    from mobiquant.nn import lean
    from mobiquant.tasks import decode

    model = build_tiny_llama().to(DEV)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(8))
    ref = generate(model, prompt, 6, cuda_graph="off")
    lean_step(model)
    attn = model.model.layers[0].self_attn
    assert attn.lean_rotary is model.model.rotary_emb and "lean_rotary" not in dict(attn.named_modules())
    handed = []
    real = ta.decode_attention
    monkeypatch.setattr(ta, "decode_attention", lambda *a, **k: handed.append(a[3] is None) or real(*a, **k))
    monkeypatch.setattr(decode, "ROPE_IN_LAUNCH", True)
    for graph in ("off", "compile"):
        handed.clear()
        got = generate(model, prompt, 6, cuda_graph=graph)
        assert torch.equal(got.tokens, ref.tokens), graph
        assert handed and all(handed), graph  # every lean launch made its own cos and sin
    assert not lean.ROPE_FROM_OFFSET  # left as generate found it
    handed.clear()
    _cached_logits(model, prompt.to(DEV), 3, 8)
    assert handed and not any(handed)  # a forward outside generate: the model's cos and sin
    rot = model.model.rotary_emb
    rot.inv_freq = rot.inv_freq.half()
    first = lean._inv_freq32(attn)
    assert first.dtype == torch.float32 and lean._inv_freq32(attn) is first
    assert lean._inv_freq32(model.model.layers[-1].self_attn) is first  # one copy for every layer
    assert torch.equal(first, rot.inv_freq.float())
    rot.rope_type = "dynamic"
    assert lean.rotary_for_launch(model) is None
    lean_step(model, enable=False)
    assert "lean_rotary" not in attn.__dict__


def test_lean_step_leaves_other_models_alone():
    """Attention classes it does not reproduce (OPT's) are untouched."""
    model = build_tiny_opt()
    assert lean_step(model) == 0
    from mobiquant.nn.lean import lean_reason

    assert "not one of" in lean_reason(model.model.decoder.layers[0].self_attn)


@needs_gpu
@pytest.mark.parametrize("cache_len", [None, 700])
def test_gpu_lean_step_in_the_compiled_step(monkeypatch, cache_len):
    """fp16 on the GPU, the compiled and captured step (the decode default): the lean model's greedy tokens are the
    model's own, and its step launches the attention kernel; with a cache of 700 positions (more than
    ``SPLIT_ABOVE``) its split launch and the combining one."""
    model = build_tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2).cuda().half()
    prompt = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(5))
    ref = generate(model, prompt, 24, cuda_graph="compile", cache_len=cache_len)
    assert lean_step(model) == model.config.num_hidden_layers
    calls, combines = _launches(monkeypatch), _combine_launches(monkeypatch)
    got = generate(model, prompt, 24, cuda_graph="compile", cache_len=cache_len)
    lean_step(model, enable=False)
    assert calls and bool(combines) == (cache_len is not None)
    assert got.graph == ref.graph
    assert torch.equal(got.tokens, ref.tokens)


def test_linear_add_takes_addmm_eager_and_an_addition_compiled(monkeypatch):
    """An fp16 ``nn.Linear``'s residual: one ``addmm`` eager; under ``torch.compile`` a plain addition in the traced
    graph (Inductor fuses it with the next norm; ``addmm`` would copy the residual into its output first)."""
    lin = torch.nn.Linear(8, 6, bias=False)
    x, r = torch.randn(1, 1, 8), torch.randn(1, 1, 6)
    ref = r + lin(x)
    calls = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or addmm(*a, **k))
    torch.testing.assert_close(linear_add(lin, x, r), ref)
    assert len(calls) == 1
    monkeypatch.setattr(torch, "addmm", addmm)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(lambda a, b: linear_add(lin, a, b), backend=record)(x, r)
    torch.testing.assert_close(out, ref)
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets and torch.addmm not in targets
    assert any(getattr(t, "__name__", "") in ("add", "iadd") for t in targets), targets


def test_attention_bench_baseline_is_the_same_arithmetic():
    """``benchmarks/attention_bench.py``'s baseline (the model's rotary embedding, ``index_copy_`` and sdpa) computes
    what ``decode_attention`` computes (its PyTorch reference): its rows compare like with like."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import attention_bench as ab

    for heads, kv, dim in ab.HEADS.values():
        (L,) = ab.layers(1, heads, kv, dim, cache_len=40, pos=17, device="cpu", dtype=torch.float32)
        ref_in = {n: t.clone() for n, t in L.items()}
        ref = ta.decode_attention(**ref_in, ticket=None, scale=dim**-0.5, backend="torch")
        got = ab.model_step(L, heads, kv, dim)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert int(L["offset"]) == int(ref_in["offset"]) == 18
        torch.testing.assert_close(L["keys"], ref_in["keys"])


@contextlib.contextmanager
def _norm_calls(model, seen: list):
    """Appends to ``seen`` the name of each of the decoder layers' norms and activation as it is called."""
    names = ("input_layernorm", "post_attention_layernorm", "mlp.act_fn")
    hooks = [layer.get_submodule(n).register_forward_hook(lambda *_, n=n: seen.append(n))
             for layer in model.model.layers for n in names]  # fmt: skip
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@needs_triton
def test_lean_prologues_ride_in_the_launches(monkeypatch):
    """``lean_step(prologues=True)``: a packed tiny LLaMA (fused sites and inputs) at a static view makes each
    layer's two RMS norms in its q/k/v and gate/up site launches and its gated product in its down launch (no norm
    module or activation called at decode, each launch handed its prologue) and keeps its logits; where its routers
    decide (a routed budget) the norms and products stay as they were (the router launches make what they read)."""
    from test_fused_inputs import default_layout_model  # the tiny LLaMA, default layout, calibrated routers

    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.patching import fuse_inputs

    q = default_layout_model("site")
    fuse_inputs(q)
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4)).to(q.device)
    n_layers = q.config.num_hidden_layers
    seen: list[str] = []
    real_site, real_one = tb.bitplane_site_bits, tb.bitplane_linear

    def site_spy(*a, **k):
        seen.append("site " + (k["prologue"][0] if k.get("prologue") else "-"))
        return real_site(*a, **k)

    def one_spy(*a, **k):
        seen.append("one " + (k["prologue"][0] if k.get("prologue") else "-"))
        return real_one(*a, **k)

    @contextlib.contextmanager
    def spied():
        seen.clear()
        with _norm_calls(q, seen):
            monkeypatch.setattr(tb, "bitplane_site_bits", site_spy)
            monkeypatch.setattr(tb, "bitplane_linear", one_spy)
            yield
            monkeypatch.setattr(tb, "bitplane_site_bits", real_site)
            monkeypatch.setattr(tb, "bitplane_linear", real_one)

    steps = 3
    for k in (2, None):  # a static view, then routers where the tokens decide
        outs = _logits_each_way(q, k, ids, 3, spied, [dict(prologues=False), dict(prologues=True)])
        torch.testing.assert_close(outs[1], outs[0], atol=2e-3, rtol=2e-3)
        counts = {n: seen.count(n) for n in set(seen)}
        if k is None:  # nothing made in a launch; the norms ran as modules
            assert not any(n.endswith(("rms_norm", "silu_mul")) for n in seen), counts
            assert counts["input_layernorm"] == counts["post_attention_layernorm"] == n_layers * steps, counts
        else:  # every norm and product made in the launch it feeds; no module made them
            each = n_layers * steps
            assert counts.get("site rms_norm") == 2 * each and counts.get("one silu_mul") == each, counts
            assert not {"input_layernorm", "post_attention_layernorm", "mlp.act_fn"} & set(seen), counts


def test_lean_ticket_follows_a_packed_model():
    """A packed model's attention holds buffers, not parameters: its launch ticket is made on their device (on a
    GPU a ticket left on the CPU fails the launch), here the meta device standing in for one."""
    from test_fused_inputs import default_layout_model

    q = default_layout_model("site").to("meta")
    attn = q.model.layers[0].self_attn
    assert next(attn.parameters(), None) is None  # what the ticket's device cannot be read from
    assert lean_step(q) == q.config.num_hidden_layers
    assert attn.lean_ticket.device.type == "meta"
    lean_step(q, enable=False)


@needs_triton
def test_lean_prologues_in_the_compiled_step(monkeypatch):
    """``cuda_graph='compile'`` (on the CPU compiled, not captured; the launches in the interpreter outside the
    compiled code): a packed tiny LLaMA at a static view with the prologues in its launches gives the greedy tokens
    of the lean step without them, its site launches handed their norms (the per-launch decision runs outside the
    compiled graph)."""
    from test_fused_inputs import default_layout_model

    import mobiquant as mq
    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.patching import fuse_inputs

    q = default_layout_model("site")
    fuse_inputs(q)
    mq.set_static(q, 2)
    prompt = torch.randint(0, q.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(8))
    real = tb.bitplane_site_bits
    handed: list[bool] = []
    monkeypatch.setattr(
        tb, "bitplane_site_bits", lambda *a, **k: handed.append(k.get("prologue") is not None) or real(*a, **k)
    )
    tokens, made = [], []
    for prologues in (False, True):
        handed.clear()
        lean_step(q, prologues=prologues)
        tokens.append(generate(q, prompt, 4, cuda_graph="compile").tokens)
        made.append(sum(handed))
    lean_step(q, enable=False)
    assert torch.equal(tokens[1], tokens[0])
    assert made[0] == 0 and made[1] > 0, made  # the decode steps' site launches made their norms


@needs_triton
@needs_gpu
def test_gpu_lean_prologues_with_pdl():
    """The compiled and captured step of a packed tiny LLaMA at a static view, the prologues in its launches, with
    every launch of the layers' chain under programmatic dependent launch (``SmallConfig(pdl=True)``: the linears'
    kernels and, through the o projection's config, the attention's), or its static views' launches alone
    (``pdl="static"``), or the default rule's (None: static views of at most 4 planes), gives the greedy tokens of
    the same step without it; so does a routed budget with ``pdl="static"`` or the default (its routers and views on
    the device without the attribute, any static launch with it)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    from test_fused_inputs import default_layout_model

    import mobiquant as mq
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.patching import fuse_inputs, set_small_config

    q = default_layout_model("site")
    fuse_inputs(q)
    mq.set_static(q, 2)
    prompt = torch.randint(0, q.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(9))

    def greedy(pdl):
        set_small_config(q, SmallConfig(pdl=pdl))  # None: the default rule (static views of at most 4 planes)
        lean_step(q, prologues=True)
        g = generate(q, prompt, 8, cuda_graph="compile")
        lean_step(q, enable=False)
        assert g.graph == "compile", g.graph
        return g.tokens

    ref = greedy(False)
    assert torch.equal(greedy(True), ref) and torch.equal(greedy("static"), ref) and torch.equal(greedy(None), ref)
    mq.set_budget(q, 4.5)  # the tokens choose their views on the device
    assert torch.equal(greedy("static"), greedy(False)) and torch.equal(greedy(None), greedy(False))
    set_small_config(q, None)


def _made_spy(q, monkeypatch):
    """``(made, spied)``: ``spied`` a context in which ``made`` (cleared on entry) records the kind of each
    :class:`~mobiquant.kernels.epilogue.NextInput` filled after a launch that did not fill it, and the name of each of
    ``q``'s layers' norms and activation as it is called."""
    from mobiquant.kernels.epilogue import NextInput

    made: list[str] = []
    real_make = NextInput.make

    def make(self, y):
        made.append(self.kind)
        real_make(self, y)

    @contextlib.contextmanager
    def spied():
        made.clear()
        with _norm_calls(q, made):
            yield

    monkeypatch.setattr(NextInput, "make", make)
    return made, spied


@needs_triton
def test_lean_epilogues_hand_the_norm_and_product_over(monkeypatch):
    """Where the linears' launches can make the next launch's input (``SmallConfig.fragment_epilogues`` on the
    fragment kernel; here every launch is asked to, and on the CPU each request is filled in PyTorch after the launch
    that could not): the lean layer of a packed tiny LLaMA at a static view hands its o launch the post-attention
    norm (the gate/up launch reads ``outputs * weight`` and scales) and its gate/up site the gated product (the down
    launch reads it), and its down launch the next layer's input norm (which every layer but the first takes), calls
    neither the post-attention norm nor the activation, and keeps its logits."""
    from test_fused_inputs import default_layout_model

    from mobiquant.nn import lean
    from mobiquant.patching import fuse_inputs

    q = default_layout_model("site")
    fuse_inputs(q)
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5)).to(q.device)
    real_takes = lean._takes
    made, spied = _made_spy(q, monkeypatch)
    outs = _logits_each_way(q, 2, ids, 3, spied, [dict(prologues=True)])
    assert "rms_norm" not in made and "silu_mul" not in made  # not asked for: the CPU's launches cannot
    real_handed, handed = lean._handed, []

    def took(layer, x):  # each layer's input norm: made by the layer before's down launch, or not
        got = real_handed(layer, x)
        handed.append(got is not None)
        return got

    monkeypatch.setattr(lean, "_handed", took)
    monkeypatch.setattr(lean, "_makes", lambda *a: True)
    monkeypatch.setattr(lean, "_takes", lambda lin, x, kind="rms_norm": kind == "rms_scale" or real_takes(lin, x, kind))
    outs += _logits_each_way(q, 2, ids, 3, spied, [dict(prologues=True)])
    torch.testing.assert_close(outs[1], outs[0], atol=2e-3, rtol=2e-3)
    n, tokens = q.config.num_hidden_layers, 3
    assert n > 1 and made.count("silu_mul") == n * tokens, made
    assert made.count("rms_norm") == (2 * n - 1) * tokens, made  # each o launch's, each down launch's but the last
    assert "post_attention_layernorm" not in made and "mlp.act_fn" not in made, made
    assert handed == [False, True] * tokens if n == 2 else handed.count(True) == (n - 1) * tokens, handed


@needs_triton
def test_static_block_router_leaves_the_handed_norm_to_the_launch(monkeypatch):
    """One router a block (``router=block``: q/k/v its home linears, the rest borrowing its decisions) at a static
    view, the layer before's down launch handing the next layer its input norm's parts (every launch asked to, as in
    :func:`test_lean_epilogues_hand_the_norm_and_product_over`; the first layer's q/k/v make it from the input): no
    linear asks the router's decisions, so the home linears leave the norm to their (site's) launch
    (``TokenRouter.idle_for``) instead of each making the normed row for the router first (on the CPU only the
    launches that cannot take it make it, one each: ``_made_here``); at a routed budget q/k/v's router decides and is
    not told so. The logits stay those of the step without the requests."""
    from test_fused_inputs import default_layout_model

    from mobiquant.nn import lean
    from mobiquant.nn import linear as lin_mod
    from mobiquant.nn.router import TokenRouter
    from mobiquant.patching import fuse_inputs

    q = default_layout_model("block")
    fuse_inputs(q)
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5)).to(q.device)
    ref = _logits_each_way(q, 2, ids, 3, None, [dict(prologues=True)])
    real_takes, real_made, real_here = lean._takes, lin_mod.made_input, lin_mod.MoBiLinear._made_here
    made, here, idle = [], [], []
    monkeypatch.setattr(lean, "_makes", lambda *a: True)
    monkeypatch.setattr(lean, "_takes", lambda lin, x, kind="rms_norm": kind == "rms_scale" or real_takes(lin, x, kind))
    monkeypatch.setattr(lin_mod, "made_input", lambda x, p: made.append(p[0]) or real_made(x, p))
    monkeypatch.setattr(lin_mod.MoBiLinear, "_made_here", lambda self, x, p: here.append(p[0]) or real_here(self, x, p))
    real_hold = TokenRouter.hold_idle
    monkeypatch.setattr(TokenRouter, "hold_idle", lambda self, x: idle.append(1) or real_hold(self, x))
    got = _logits_each_way(q, 2, ids, 3, None, [dict(prologues=True)])
    torch.testing.assert_close(got[0], ref[0], atol=2e-3, rtol=2e-3)
    n, tokens = q.config.num_hidden_layers, 3
    assert len(idle) == n * tokens, idle  # each layer's q/k/v (the first's make the norm from the input), each step
    assert "rms_scale" in here and made == here, (made, here)  # no home linear made the norm for its router
    idle.clear()
    _logits_each_way(q, None, ids, 3, None, [dict(prologues=True)])
    assert idle == []  # routed: the router decides on the block's input


@needs_triton
def test_home_linears_make_a_decided_norm_once(monkeypatch):
    """One router a block at a routed budget with q/k/v (its home linears) at a static view and its borrowers routed
    (a per-linear plan can split a block so), each layer handed its input norm (every launch asked to, as in
    :func:`test_lean_epilogues_hand_the_norm_and_product_over`): the router decides on the normed row, which the home
    linears make once between them (``TokenRouter.made_once``: one normed row a layer and step, not one each, so
    their site's one launch serves them) and the borrowers' decisions are those of the step without the requests."""
    from test_fused_inputs import default_layout_model

    import mobiquant as mq
    from mobiquant.nn import lean
    from mobiquant.nn import linear as lin_mod
    from mobiquant.patching import fuse_inputs

    q = default_layout_model("block")
    fuse_inputs(q)
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4)).to(q.device)
    mq.set_budget(q, 4.5)
    for layer in q.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.set_static(2)
    lean_step(q, prologues=True)
    ref = torch.cat(_cached_logits(q, ids, 3, 10))
    real_takes, real_made, real_here = lean._takes, lin_mod.made_input, lin_mod.MoBiLinear._made_here
    made, here = [], []
    monkeypatch.setattr(lean, "_makes", lambda *a: True)
    monkeypatch.setattr(lean, "_takes", lambda lin, x, kind="rms_norm": kind == "rms_scale" or real_takes(lin, x, kind))
    monkeypatch.setattr(lin_mod, "made_input", lambda x, p: made.append(p[0]) or real_made(x, p))
    monkeypatch.setattr(lin_mod.MoBiLinear, "_made_here", lambda self, x, p: here.append(p[0]) or real_here(self, x, p))
    got = torch.cat(_cached_logits(q, ids, 3, 10))
    lean_step(q, enable=False)
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
    n, tokens = q.config.num_hidden_layers, 3
    by_home = made.count("rms_scale") - here.count("rms_scale")  # not by a launch that could not take it (the CPU's)
    assert by_home == (n - 1) * tokens, (made, here)  # each layer handed its norm: made once, not once a linear


@needs_triton
@needs_gpu
def test_gpu_lean_epilogues():
    """On the GPU, a packed LLaMA whose linears the fragment kernel serves (widths of 1024 and 2048, groups of 128) at
    a static view: with ``SmallConfig(fragment_epilogues=True)`` the o launches make the post-attention norms' parts
    and the gate/up launches the products (each request filled by its launch), and the compiled, captured step gives
    logits of the step without them, step by step."""
    import mobiquant as mq
    from mobiquant.kernels.triton_bitplane import SmallConfig

    q = _fragment_llama(mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=128))
    mq.set_static(q, 2)
    (off, none), (on, kinds) = (_epilogue_kinds(q, SmallConfig(fragment_epilogues=e)) for e in (False, True))
    # each o launch and each down launch but the last a norm's parts, each gate/up launch a product
    assert none == [] and kinds.count("silu_mul") == 2 * 3 and kinds.count("rms_norm") == (2 * 2 - 1) * 3, kinds
    torch.testing.assert_close(on, off, atol=3e-2, rtol=3e-2)


def test_chains_where_asked_by_kind():
    """``SmallConfig.fragment_chain`` (True, or a kind's name) chains a next input into a reader decoding a static view
    on a GPU; not another kind, not a view on the device, not the CPU, not a linear with no settings; other values
    refused."""
    from types import SimpleNamespace as NS

    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.nn.lean import _chains

    def making(chain):
        return NS(small_config=SmallConfig(fragment_chain=chain))

    gpu, static, on_device = NS(is_cuda=True), NS(decodes_static=True), NS(decodes_static=False)
    assert _chains(making(True), static, gpu, "silu_mul") and _chains(making(True), static, gpu, "rms_norm")
    assert _chains(making("rms_norm"), static, gpu, "rms_norm") and not _chains(
        making("rms_norm"), static, gpu, "silu_mul"
    )
    assert not _chains(making(True), on_device, gpu, "silu_mul") and not _chains(making(False), static, gpu, "silu_mul")
    assert not _chains(making(True), static, NS(is_cuda=False), "silu_mul") and not _chains(
        NS(), static, gpu, "rms_norm"
    )
    with pytest.raises(ValueError, match="fragment_chain must be"):
        SmallConfig(fragment_chain="rms")


@needs_triton
@needs_gpu
def test_gpu_lean_chain():
    """On the GPU, ``SmallConfig(fragment_chain=True)`` at a static 4-plane view: each o launch makes the post-attention
    norm's parts with their count and each gate/up launch reads them chained, each gate/up launch makes the product
    with its flags and each down launch reads it chained (every flag reset after); the step's logits are those of the
    step without the chain, step by step, and a generation through the captured graph gives the greedy tokens of the
    eager one."""
    import mobiquant as mq
    from mobiquant.kernels import gluon_fragment as gf
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.patching import set_small_config

    q = _fragment_llama(mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=128))
    mq.set_static(q, 2)
    off, _ = _epilogue_kinds(q, SmallConfig())
    real, taken = gf.chained_product, []

    def spy(x):
        made = real(x)
        taken.append(made is not None)
        return made

    gf.chained_product = spy
    try:
        on, kinds = _epilogue_kinds(q, SmallConfig(fragment_chain=True))
    finally:
        gf.chained_product = real
    n, steps = q.config.num_hidden_layers, 3
    assert kinds.count("silu_mul") == n * steps and taken.count(True) == 2 * n * steps, (kinds, taken)
    torch.testing.assert_close(on, off, atol=3e-2, rtol=3e-2)
    for layer in q.model.layers:
        held = [
            *layer.mlp.gate_proj.__dict__["_chain_flags"].values(),
            *layer.self_attn.o_proj.__dict__["_chain_flags"].values(),
        ]
        assert len(held) == 2 and all(
            int(f.abs().sum()) == 0 for f in held
        )  # reset by each reading launch's last program
    prompt = torch.randint(0, q.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(9)).cuda()
    lean_step(q, prologues=True)
    set_small_config(q, SmallConfig(fragment_chain=True))
    try:
        ref = generate(q, prompt, 8, cuda_graph="off")
        got = generate(q, prompt, 8, cuda_graph="graph")
    finally:
        set_small_config(q, None)
        lean_step(q, enable=False)
    assert torch.equal(got.tokens, ref.tokens)


@needs_triton
@needs_gpu
def test_gpu_static_block_router_one_launch_a_site():
    """On the GPU, one router a block (``router=block``) at a static 4-plane view with the default settings (its
    launches make the next one's norm): each step is one fragment launch a site (q/k/v, o, gate/up, down) in every
    layer, the second layer's q/k/v site making the norm the first layer's down launch handed it, none making it
    beforehand for the router (no linear asks its decisions), and the logits are those of the step without the lean
    layer's prologues."""
    import mobiquant as mq

    q = _fragment_llama(mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=128, router_placement="block"))
    mq.set_static(q, 2)
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6)).cuda()
    lean_step(q, prologues=False)
    ref = torch.cat(_cached_logits(q, ids, 3, 10))
    lean_step(q, enable=False)
    launches: list[str | None] = []
    got = _fragment_logits(q, ids, lambda k: launches.append(None if k.get("prologue") is None else k["prologue"][0]))
    n, steps = q.config.num_hidden_layers, 3
    assert len(launches) == 4 * n * steps, launches
    assert launches.count("rms_scale") == (2 * n - 1) * steps, launches  # gate/up everywhere, q/k/v but the first
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


def _fragment_llama(cfg):
    """A packed two-layer LLaMA of widths 1024 / 2048 (the fragment kernel serves its linears) quantized by ``cfg``,
    thresholds calibrated, frozen, fp16 on the GPU, its inputs fused."""
    import mobiquant as mq
    from mobiquant.patching import fuse_inputs

    model = build_tiny_llama(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4,
                             num_hidden_layers=2)  # fmt: skip
    mq.quantize_model(model, cfg)
    g = torch.Generator().manual_seed(100)
    mq.calibrate_thresholds(model, [torch.randint(0, model.config.vocab_size, (4, 32), generator=g) for _ in range(2)])
    mq.freeze(model)
    q = model.half().cuda().eval()
    fuse_inputs(q)
    return q


def _epilogue_kinds(q, config) -> tuple[torch.Tensor, list[str]]:
    """``q``'s step-by-step logits with the lean step and its prologues under ``config`` (3 steps after a 3-token
    prompt), and the kind of each epilogue a fragment launch was handed."""
    from mobiquant.patching import set_small_config

    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6)).cuda()
    kinds: list[str] = []
    set_small_config(q, config)
    try:
        logits = _fragment_logits(q, ids, lambda k: k.get("epilogue") is None or kinds.append(k["epilogue"].kind))
    finally:
        set_small_config(q, None)
    return logits, kinds


def _fragment_logits(q, ids, record) -> torch.Tensor:
    """``q``'s step-by-step logits (3 steps after a 3-token prompt of ``ids``) with the lean step and its prologues,
    ``record`` called with the keywords of each fragment launch."""
    from mobiquant.kernels import gluon_fragment as gf

    real = gf.fragment_linear

    def spy(*a, **k):
        record(k)
        return real(*a, **k)

    lean_step(q, prologues=True)
    gf.fragment_linear = spy
    try:
        return torch.cat(_cached_logits(q, ids, 3, 10))
    finally:
        gf.fragment_linear = real
        lean_step(q, enable=False)


@needs_triton
def test_lean_epilogues_in_the_compiled_step(monkeypatch):
    """``cuda_graph='compile'`` (on the CPU compiled, not captured): with every launch asked to make the next one's
    input (filled in PyTorch here, as in :func:`test_lean_epilogues_hand_the_norm_and_product_over`) the second
    layer still finds the norm the first layer's down launch made for it (the handover by the output tensor's
    identity holds across the compiled code between two layers), and the greedy tokens are those of the compiled lean
    step without the requests."""
    from test_fused_inputs import default_layout_model

    import mobiquant as mq
    from mobiquant.nn import lean
    from mobiquant.patching import fuse_inputs

    q = default_layout_model("site")
    fuse_inputs(q)
    mq.set_static(q, 2)
    prompt = torch.randint(0, q.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(8))
    real_handed, real_takes, handed = lean._handed, lean._takes, []

    def took(layer, x):
        got = real_handed(layer, x)
        handed.append(got is not None)
        return got

    tokens = []
    for epi in (False, True):
        if epi:
            monkeypatch.setattr(lean, "_handed", torch.compiler.disable(took))
            monkeypatch.setattr(lean, "_makes", torch.compiler.disable(lambda *a: True))
            monkeypatch.setattr(
                lean,
                "_takes",
                torch.compiler.disable(lambda lin, x, kind="rms_norm": kind == "rms_scale" or real_takes(lin, x, kind)),
            )
        torch.compiler.reset()
        lean_step(q, prologues=True)
        g = generate(q, prompt, 4, cuda_graph="compile")
        lean_step(q, enable=False)
        assert g.graph == "compile", g.graph
        tokens.append(g.tokens)
    assert torch.equal(tokens[1], tokens[0])
    assert True in handed and handed.count(True) == handed.count(False), handed  # the second layer's, each step


@needs_triton
def test_routed_epilogues_asked_of_borrowers_only(monkeypatch):
    """``SmallConfig(fragment_routed_epilogues=True)`` with one router a block (``router=block``) at a routed budget:
    the o launch (a borrower) and the gate/up site launch are asked to make the post-attention norm's parts and the
    gated product, gate/up (borrowers: their decisions come from the block's input) take the made norm, q/k/v (the
    router's home linears, whose router reads their input) do not, with no config set too (the defaults: decode's
    ``kernels: {}``); nothing is asked without the switch or at a static view that the static rule leaves out.
    Where a launch makes them is the kernels' to say (``triton_bitplane._routed_made_by``, here answered yes); the
    decisions only are checked."""
    from test_fused_inputs import default_layout_model

    import mobiquant as mq
    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.patching import fuse_inputs, set_small_config

    q = default_layout_model("block")
    fuse_inputs(q)
    mq.set_budget(q, 4.5)
    asked = []
    monkeypatch.setattr(tb, "_routed_made_by", lambda *a: asked.append(a[3]) or True)
    layer = q.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.zeros(1, 1, q.config.hidden_size, device=DEV)
    group = mlp.gate_proj._site_group
    assert group is not None and not mlp.gate_proj.router_home and attn.q_proj.router_home

    def answers(cfg):
        set_small_config(q, cfg)
        return (
            attn.o_proj.takes_epilogue(x, "rms_norm"),
            group.takes_prologue(x, cfg, "rms_scale"),
            group.takes_epilogue(x, cfg, "silu_mul"),
            attn.q_proj.takes_prologue(x, kind="rms_scale"),
        )

    routed = [m for m in (attn.o_proj, mlp.gate_proj, mlp.up_proj) if not m.decodes_static]
    assert len(routed) == 3, "the budget leaves the block's borrowers routed"
    assert answers(SmallConfig(fragment_routed_epilogues=False)) == (False, False, False, False)
    assert answers(SmallConfig()) == (True, True, True, False)  # the switch is on by default
    assert answers(None) == (True, True, True, False)  # and no config set is the defaults (decode's kernels: {})
    assert (q.config.hidden_size,) in asked and (mlp.gate_proj.out_features, mlp.up_proj.out_features) in asked
    set_small_config(q, None)


@needs_triton
def test_lean_epilogues_at_a_routed_budget_with_one_router_a_block(monkeypatch):
    """With one router a block at a routed budget, where the linears' launches can make the next launch's input
    (here every launch is asked to, the made norm taken only by linears that borrow their decisions, as
    ``MoBiLinear.takes_prologue`` rules; on the CPU each request is filled in PyTorch after its launch): the lean
    layer hands its o launch the post-attention norm and its gate/up site the product, calls neither the norm nor
    the activation, leaves q/k/v's input norm to the router that reads it, and keeps its logits."""
    from test_fused_inputs import default_layout_model

    from mobiquant.nn import lean
    from mobiquant.patching import fuse_inputs

    q = default_layout_model("block")
    fuse_inputs(q)
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7)).to(q.device)
    real_takes = lean._takes
    made, spied = _made_spy(q, monkeypatch)
    outs = _logits_each_way(q, None, ids, 3, spied, [dict(prologues=True)])
    assert "rms_norm" not in made and "silu_mul" not in made
    monkeypatch.setattr(lean, "_makes", lambda *a: True)

    def takes(lin, x, kind="rms_norm"):
        if kind == "rms_scale":
            return not lin.decodes_static and not lin.router_home  # a borrower: its decisions on another input
        return real_takes(lin, x, kind)

    monkeypatch.setattr(lean, "_takes", takes)
    outs += _logits_each_way(q, None, ids, 3, spied, [dict(prologues=True)])
    torch.testing.assert_close(outs[1], outs[0], atol=2e-3, rtol=2e-3)
    n, tokens = q.config.num_hidden_layers, 3
    assert made.count("silu_mul") == n * tokens and made.count("rms_norm") == n * tokens, made  # o's, not down's
    assert "post_attention_layernorm" not in made and "mlp.act_fn" not in made, made
    assert made.count("input_layernorm") == n * tokens, made  # q/k/v's router reads the normed input


@needs_triton
@pytest.mark.parametrize("tail", [True, "normed"])
@pytest.mark.parametrize("placement", ["block", "site"])
def test_router_tail_takes_the_router_launch_out_of_later_blocks(monkeypatch, placement, tail):
    """``SmallConfig(router_tail=True)`` at a routed budget, where the down launch can make the next block's input
    norm's parts (here every launch is asked to; on the CPU each request is filled in PyTorch after its launch, the
    router's tail too, ``epilogue.RouterTail``): every block but the first reads its input norm's parts and the gate
    values the block before made for the router that reads that norm (one router a block, or q/k/v's with one a
    site): its fused norm, the router launch, is never called, no router runs on them, and the logits are those of
    the lean step without it. ``router_tail="normed"``: the same with the normed row made there too, q/k/v taking
    it with no prologue."""
    from test_fused_inputs import default_layout_model

    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.nn import lean
    from mobiquant.nn.router import TokenRouter
    from mobiquant.patching import fuse_inputs, set_small_config

    q = default_layout_model(placement)
    fuse_inputs(q)
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7)).to(q.device)
    real_takes = lean._takes
    made, spied_norms = _made_spy(q, monkeypatch)
    runs: list[str] = []
    for name in ("routed_input", "_hard_values"):  # a router launched (fused with the norm) or run on an input
        real = getattr(TokenRouter, name)
        monkeypatch.setattr(
            TokenRouter, name, lambda self, *a, real=real, name=name: runs.append(name) or real(self, *a)
        )
    monkeypatch.setattr(lean, "_makes", lambda *a: True)

    @contextlib.contextmanager
    def spied():  # the steps' norms, requests and router runs, not the prompt's
        runs.clear()
        with spied_norms():
            yield

    def takes(lin, x, kind="rms_norm", home_made=False):
        if kind == "rms_scale":  # a borrower, or a home linear whose router's decisions were made before
            return not lin.decodes_static and (not lin.router_home or home_made or lin._decisions_made_for(x))
        return real_takes(lin, x, kind, home_made)

    monkeypatch.setattr(lean, "_takes", takes)
    from mobiquant.nn.lean import LeanAttention

    outs, counts, prologues = [], [], []
    real_module_forward = LeanAttention.forward

    def attention(self, *a, **kw):  # the prologue each q/k/v launch is handed
        prologues.append(None if kw.get("lean_prologue") is None else kw["lean_prologue"][0])
        return real_module_forward(self, *a, **kw)

    monkeypatch.setattr(LeanAttention, "forward", attention)
    for on in (False, tail):
        set_small_config(q, SmallConfig(router_tail=on))
        prologues.clear()
        outs += _logits_each_way(q, None, ids, 3, spied, [dict(prologues=True)])
        counts.append((list(made), list(runs)))
    set_small_config(q, None)
    torch.testing.assert_close(outs[1], outs[0], atol=2e-3, rtol=2e-3)
    n, tokens = q.config.num_hidden_layers, 3
    (made_off, runs_off), (made_on, runs_on) = counts
    assert n > 1 and made_off.count("input_layernorm") == n * tokens, made_off  # each block's router launch
    assert made_on.count("input_layernorm") == tokens, made_on  # the first block's only
    assert len(runs_off) - len(runs_on) == (n - 1) * tokens, (runs_off, runs_on)  # q/k/v's after the first block
    if placement == "block":
        assert len(runs_on) == tokens, runs_on  # the first block's only
    tails = [m for m in made_on if m == "rms_norm"]  # the down launches' requests (and the o launches')
    assert len(tails) >= (n - 1) * tokens, made_on
    # the blocks after the first: q/k/v read the norm's parts with rms_scale, or ("normed") the normed row as it is
    assert ("rms_scale" in prologues) == (tail is True), prologues


@needs_triton
def test_router_tail_for_borrowers_of_static_home_linears(monkeypatch):
    """One router a block whose home linears (q/k/v) decode a static view while its borrowers (o, gate/up, down)
    are routed (a budget a per-linear plan splits so): with ``SmallConfig(router_tail=True)`` the down launch before
    still finishes the router for the borrowers (the q/k/v launch reads the norm's parts at its static view), no
    router runs in any block but the first, and the logits are those without it (where the router runs on the
    normed input the static q/k/v made)."""
    from test_fused_inputs import default_layout_model

    import mobiquant as mq
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.nn import lean
    from mobiquant.nn.router import TokenRouter
    from mobiquant.patching import fuse_inputs, set_small_config

    q = default_layout_model("block")
    fuse_inputs(q)
    mq.set_budget(q, 4.5)
    for layer in q.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, name).set_static(2)
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(9)).to(q.device)
    runs: list[int] = []
    real = TokenRouter._hard_values
    monkeypatch.setattr(TokenRouter, "_hard_values", lambda self, *a: runs.append(1) or real(self, *a))
    monkeypatch.setattr(lean, "_makes", lambda *a: True)
    real_takes = lean._takes
    monkeypatch.setattr(lean, "_takes", lambda lin, x, kind="rms_norm", home_made=False: kind == "rms_scale" or
                        real_takes(lin, x, kind, home_made))  # fmt: skip

    @contextlib.contextmanager
    def steps():
        runs.clear()
        yield

    outs, seen = [], []
    for tail in (False, True):
        set_small_config(q, SmallConfig(router_tail=tail))
        lean_step(q, prologues=True)
        outs.append(torch.cat(_cached_logits(q, ids, 3, 10, steps)))
        lean_step(q, enable=False)
        seen.append(len(runs))
    set_small_config(q, None)
    n, tokens = q.config.num_hidden_layers, 3
    assert n > 1 and seen == [n * tokens, tokens], seen
    torch.testing.assert_close(outs[1], outs[0], atol=2e-3, rtol=2e-3)


@needs_triton
def test_router_tail_not_asked_where_no_linear_is_routed(monkeypatch):
    """One router a block, ``SmallConfig(router_tail=True)``, every launch able to make the next one's input: where
    the home linears (q/k/v) decode a static view and their borrowers are routed, the down launch is asked to finish
    the next block's router; at static views everywhere (``set_static``) it is not (no linear asks for the
    decisions: a tail would cost every static step its shares and its last program's router)."""
    from test_fused_inputs import default_layout_model

    import mobiquant as mq
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.nn import lean
    from mobiquant.patching import fuse_inputs, set_small_config

    q = default_layout_model("block")
    fuse_inputs(q)
    monkeypatch.setattr(lean, "_makes", lambda *a: True)
    real_takes, real_request, asked = lean._takes, lean._router_norm_request, []
    monkeypatch.setattr(lean, "_takes", lambda lin, x, kind="rms_norm", home_made=False: kind == "rms_scale" or
                        real_takes(lin, x, kind, home_made))  # fmt: skip
    monkeypatch.setattr(lean, "_router_norm_request", lambda *a: asked.append(real_request(*a)) or asked[-1])
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(9)).to(q.device)
    set_small_config(q, SmallConfig(router_tail=True))
    lean_step(q, prologues=True)
    seen = []
    for static_homes in (True, False):
        mq.set_budget(q, 4.5)
        if static_homes:
            for layer in q.model.layers:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).set_static(2)
        else:
            mq.set_static(q, 2)
        asked.clear()
        _cached_logits(q, ids, 3, 10, contextlib.nullcontext)
        seen.append(sum(a is not None and a.router is not None for a in asked))
    lean_step(q, enable=False)
    set_small_config(q, None)
    n, tokens = q.config.num_hidden_layers, 3
    assert n > 1 and seen == [(n - 1) * tokens, 0], seen


@needs_triton
@pytest.mark.parametrize("kind", [True, "normed"])
def test_router_tail_in_the_compiled_step(monkeypatch, kind):
    """``cuda_graph='compile'`` (on the CPU compiled, not captured) at a routed budget with one router a block and
    ``SmallConfig(router_tail=True)``, every down launch asked to make the next block's norm and router (filled in
    PyTorch here): the second block finds the parts (or, ``"normed"``, the normed row) and gate values its router
    holds across the compiled code between two blocks, and the greedy tokens are those of the compiled lean step
    without it."""
    from test_fused_inputs import default_layout_model

    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.nn import lean
    from mobiquant.patching import fuse_inputs, set_small_config

    q = default_layout_model("block")
    fuse_inputs(q)
    prompt = torch.randint(0, q.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(8))
    real_handed, real_takes, routers = lean._handed, lean._takes, []

    def took(layer, x):
        got = real_handed(layer, x)
        routers.append(got is not None and got.router is not None)
        return got

    def takes(lin, x, kind="rms_norm", home_made=False):
        if kind == "rms_scale":
            return not lin.decodes_static and (not lin.router_home or home_made or lin._decisions_made_for(x))
        return real_takes(lin, x, kind, home_made)

    monkeypatch.setattr(lean, "_handed", torch.compiler.disable(took))
    monkeypatch.setattr(lean, "_makes", torch.compiler.disable(lambda *a: True))
    monkeypatch.setattr(lean, "_takes", torch.compiler.disable(takes))
    tokens = []
    for tail in (False, kind):
        set_small_config(q, SmallConfig(router_tail=tail))
        routers.clear()
        torch.compiler.reset()
        lean_step(q, prologues=True)
        g = generate(q, prompt, 4, budget=4.5, cuda_graph="compile")
        lean_step(q, enable=False)
        assert g.graph == "compile", g.graph
        tokens.append(g.tokens)
        assert any(routers) == bool(tail), routers
    set_small_config(q, None)
    assert torch.equal(tokens[1], tokens[0])
    assert routers.count(True) == routers.count(False), routers  # the second block's, each step


@needs_triton
@needs_gpu
@pytest.mark.parametrize("kind", [True, "normed"])
def test_gpu_router_tail(kind):
    """On the GPU, the packed LLaMA of widths 1024 / 2048 with one router a block at a routed budget set as decode
    sets it: with ``SmallConfig(router_tail=True)`` the first block's down launch makes the second block's input
    norm's parts and finishes its router (a fragment launch handed a request with a router), the second block's
    fused norm (its router launch) is not called, and the step-by-step logits are those without it; the same with
    ``router_tail="normed"`` (the normed row made in that launch too, the fragment kernel's ``EPI`` 4)."""
    import mobiquant as mq
    from mobiquant.kernels import gluon_fragment as gf
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.patching import set_small_config
    from mobiquant.tasks.decode import BudgetControl

    cfg = mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=128, router_placement="block",
                        router_policy="adjacent")  # fmt: skip
    q = _fragment_llama(cfg)
    BudgetControl.of(q).apply(3.5)
    ids = torch.randint(0, q.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6)).cuda()
    norms: list[int] = []
    second = q.model.layers[1].input_layernorm
    hook = second.register_forward_hook(lambda *_: norms.append(1))
    tails: list[bool] = []
    real = gf.fragment_linear

    def spy(*a, **k):
        e = k.get("epilogue")
        if e is not None and e.kind == "rms_norm":
            tails.append(e.router is not None and e.normed == (kind == "normed"))
        return real(*a, **k)

    @contextlib.contextmanager
    def steps():  # the steps' calls, not the prompt's
        norms.clear()
        tails.clear()
        yield

    outs, seen = [], []
    try:
        for tail in (False, kind):
            set_small_config(q, SmallConfig(router_tail=tail))
            lean_step(q, prologues=True)
            gf.fragment_linear = spy
            try:
                outs.append(torch.cat(_cached_logits(q, ids, 3, 10, steps)))
            finally:
                gf.fragment_linear = real
                lean_step(q, enable=False)
            seen.append((len(norms), tails.count(True)))
    finally:
        hook.remove()
        set_small_config(q, None)
    assert seen == [(3, 0), (0, 3)], seen  # the second block's router launch each step, or a tail made before
    torch.testing.assert_close(outs[1], outs[0], atol=3e-2, rtol=3e-2)


@needs_triton
@needs_gpu
def test_gpu_lean_routed_epilogues():
    """On the GPU, a packed LLaMA with one router a block whose linears the fragment kernel serves (widths of 1024 and
    2048, groups of 128) at a routed budget: with ``SmallConfig(fragment_routed_epilogues=True)`` the o launches make
    the post-attention norms' parts and the gate/up launches the products (views read on the device), and the
    step-by-step logits are those of the step without them. The budget is set as decode sets it
    (:class:`~mobiquant.tasks.decode.BudgetControl`), which gives each routed launch its span of views: without one,
    launches of these sizes read the view on the one-bit plane kernel, which makes no epilogue."""
    import mobiquant as mq
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.patching import mobi_linears
    from mobiquant.tasks.decode import BudgetControl

    cfg = mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=128, router_placement="block",
                        router_policy="adjacent")  # fmt: skip
    q = _fragment_llama(cfg)
    BudgetControl.of(q).apply(3.5)  # as decode sets a budget: each routed linear's pair of views known (its span)
    assert all(m.pair_k == 1 for _, m in mobi_linears(q)), "budget 3.5 leaves every linear routed"
    runs = [
        _epilogue_kinds(q, SmallConfig(fragment_routed_epilogues=e, fragment_epilogues=False)) for e in (False, True)
    ]
    (off, none), (on, kinds) = runs
    assert none == [] and kinds.count("silu_mul") == 2 * 3 and kinds.count("rms_norm") >= 2 * 3, kinds
    torch.testing.assert_close(on, off, atol=3e-2, rtol=3e-2)
