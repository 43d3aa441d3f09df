"""The requests a launch fills for the next (:mod:`mobiquant.kernels.epilogue`): the router an RMS norm's parts also
finish, in PyTorch (the reference the fragment kernel's ``EPI`` 3 follows) and as the kernel's arguments."""

from __future__ import annotations

import pytest
import torch

from mobiquant.kernels.epilogue import ROUTER_MAX_HIDDEN, NextInput
from mobiquant.nn.fused import rms_norm
from mobiquant.nn.router import TokenRouter


def _router(n: int, policy: str, hidden: int = 48) -> TokenRouter:
    torch.manual_seed(3)
    r = TokenRouter(n, (3, 1, 1, 1, 1, 1), hidden=hidden, policy=policy)
    with torch.no_grad():
        for p in r.parameters():
            p.normal_(0, 0.5)
    return r


def _tail_args(r: TokenRouter) -> tuple:
    w1, b1, w2, b2 = r._weights()
    return (w1.detach(), b1.detach(), w2.detach(), b2.detach(), r.policy == "adjacent")


@pytest.mark.parametrize("policy", ["adjacent", "free"])
@pytest.mark.parametrize("n", [300, 512])
def test_router_tail_finishes_the_router_on_the_norms_output(policy, n):
    """A norm's parts with the router that reads the norm's output (``NextInput.rms_norm(router=...)``), made from a
    launch's outputs in PyTorch: the row times the weight and the blocks' sums as before, each row block's share of
    the first layer (a block of 128 rows, the last one short at 300), and the gate values the router gives the
    normed row (``W1 norm(h) = rsqrt(mean(h^2) + eps) W1 (h w)``) within fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1, n, generator=g)
    weight = torch.rand(n, generator=g) + 0.5
    r = _router(n, policy)
    req = NextInput.rms_norm(weight, 1e-5, y, router=_tail_args(r))
    req.make(y)
    blocks = -(-n // 128)
    assert req.made and req.router is not None and tuple(req.router.part.shape) == (blocks, 64)
    torch.testing.assert_close(req.out, y * weight)
    want = r.gate_values(r.scores(rms_norm(y, weight, 1e-5)))
    torch.testing.assert_close(req.router.values, want.float(), atol=1e-5, rtol=1e-5)
    assert (req.router.part[:, 48:] == 0).all()  # the slots past the hidden units
    w1 = r._weights()[0].detach()
    torch.testing.assert_close(req.router.part[0, :48], w1[:, :128] @ (y * weight)[0, :128])


def test_router_tail_normed_makes_the_normed_row_in_place():
    """``NextInput.rms_norm(router=..., normed=True)``: the same shares and gate values, and ``out`` then holds the
    normed row itself, rounded as the kernel rounds it (``fp16(fp32(h w) * rsqrt)``, what ``rms_scale`` makes of
    the parts), within fp16 rounding of the model's norm; its next launch reads it with no prologue."""
    from mobiquant.kernels.epilogue import rms_scaled

    g = torch.Generator().manual_seed(2)
    y = torch.randn(1, 512, generator=g).half()
    weight = (torch.rand(512, generator=g) + 0.5).half()
    args = tuple(t.half() if torch.is_tensor(t) else t for t in _tail_args(_router(512, "adjacent")))
    parts = NextInput.rms_norm(weight, 1e-5, y, router=args)
    normed = NextInput.rms_norm(weight, 1e-5, y, router=args, normed=True)
    parts.make(y)
    normed.make(y)
    assert normed.normed and not parts.normed and normed.prologue() is None
    assert parts.prologue() is not None and parts.prologue()[0] == "rms_scale"
    torch.testing.assert_close(normed.router.values, parts.router.values, atol=0, rtol=0)
    assert torch.equal(normed.out, rms_scaled(parts.out, parts.sums, 1e-5))
    torch.testing.assert_close(normed.out.float(), rms_norm(y.float(), weight.float(), 1e-5), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="normed: the normed row is made by a router's tail"):
        NextInput.rms_norm(weight, 1e-5, y, normed=True)


def test_router_tail_checks_its_router():
    """A router whose layers do not fit the norm (``w1`` of another width, ``w2`` not of the hidden units, more
    hidden units than the epilogue's slots) is refused with what was expected."""
    like = torch.zeros(1, 256)
    r = _tail_args(_router(256, "adjacent"))
    with pytest.raises(ValueError, match=r"w1 \[hidden, 256\].*\(48, 200\)"):
        NextInput.rms_norm(torch.ones(256), 1e-5, like, router=(torch.zeros(48, 200), *r[1:]))
    with pytest.raises(ValueError, match=r"w2 \[K-1, hidden\]"):
        NextInput.rms_norm(torch.ones(256), 1e-5, like, router=(*r[:2], torch.zeros(5, 40), *r[3:]))
    big = _tail_args(_router(256, "adjacent", hidden=ROUTER_MAX_HIDDEN + 1))
    with pytest.raises(ValueError, match=f"at most {ROUTER_MAX_HIDDEN} hidden units"):
        NextInput.rms_norm(torch.ones(256), 1e-5, like, router=big)
    assert NextInput.rms_norm(torch.ones(256), 1e-5, like).router is None


def test_router_tail_launch_args():
    """The fragment kernel's keywords for a norm's parts with a router (``EPI`` 3: the router's layers, its shares,
    its gate values, one ticket, the norm's eps; ``ER`` gate values from ``ERH`` hidden units in ``ERHP`` slots),
    with the normed row too (``EPI`` 4), for the norm alone (``EPI`` 1) and for none (placeholders)."""
    gf = pytest.importorskip("mobiquant.kernels.gluon_fragment")
    words = torch.zeros(4, 32, 4, 512, dtype=torch.int32)
    sc, x = torch.zeros(512, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16)
    out = torch.zeros(512, dtype=torch.float16)
    like = torch.zeros(1, 512, dtype=torch.float16)
    r = _tail_args(_router(512, "free"))
    req = NextInput.rms_norm(
        torch.ones(512), 1e-6, like, router=tuple(t.half() if torch.is_tensor(t) else t for t in r)
    )
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, out_mode=1, epilogue=req)
    assert req.router is not None
    assert (kw["EPI"], kw["ER"], kw["ERH"], kw["ERHP"], kw["ERADJ"], kw["ep_eps"]) == (3, 5, 48, 64, False, 1e-6)
    assert kw["ep_w1_ptr"] is req.router.w1 and kw["ep_v_ptr"] is req.router.values and kw["ep_sq_ptr"] is req.sums
    half = tuple(t.half() if torch.is_tensor(t) else t for t in r)
    normed = NextInput.rms_norm(torch.ones(512), 1e-6, like, router=half, normed=True)
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, out_mode=1, epilogue=normed)
    assert kw["EPI"] == 4 and kw["ep_out_ptr"] is normed.out  # the normed row made in place of the parts
    _, kw = gf._launch_args(
        words, sc, sc, x, out, planes=4, out_mode=1, epilogue=NextInput.rms_norm(torch.ones(512), 1e-6, like)
    )
    assert kw["EPI"] == 1 and kw["ER"] == 1
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4)
    assert kw["EPI"] == 0 and kw["ep_w1_ptr"] is out


def test_held_decisions_are_for_that_input_only_and_not_pickled():
    """``TokenRouter.hold_values``: the held gate values answer for that very input (``made_for``, ``gate_values_of``,
    ``slice_counts`` at the router's threshold) and for the input a linear makes from it (``pass_values``), for no
    other tensor; a router holding them pickles (deep-copies) without them."""
    import copy

    r = _router(64, "adjacent")
    x, other = torch.randn(1, 64), torch.randn(1, 64)
    values = torch.tensor([[6.9, 4.2, 2.1, 0.3, 0.1]])
    r.tau.fill_(2.5)
    r.hold_values(x, values)
    assert r.made_for(x) and not r.made_for(other)
    assert r.gate_values_of(x) is values and int(r.slice_counts(x)) == 1 + 2  # 6.9 and 4.2 above 2.5
    made = x * 2
    r.pass_values(x, made)
    assert r.gate_values_of(made) is values and not r.made_for(made)
    assert not torch.equal(r.gate_values_of(other), values)  # its own decisions
    twin = copy.deepcopy(r)
    assert not twin.made_for(x) and twin.__dict__.get("_made_for") is None
    r.clear_cache()
    assert not r.made_for(x)


def test_router_tail_setting_is_checked():
    """``SmallConfig.router_tail``: False, True or "normed"; anything else refused with the choices."""
    from mobiquant.kernels.triton_bitplane import SmallConfig

    assert SmallConfig().router_tail is False and SmallConfig(router_tail="normed").router_tail == "normed"
    with pytest.raises(ValueError, match=r"router_tail must be False, True .* or 'normed' .*got 'yes'"):
        SmallConfig(router_tail="yes")
