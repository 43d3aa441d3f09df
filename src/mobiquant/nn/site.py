"""``SiteGroup``: the linears of one router site (q, k and v; gate and up) decoded by one kernel launch.

A decode step of a patched LLaMA calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` one after the other on the same
input ``x``, and the three share a router. With a site group (:func:`mobiquant.patching.fuse_sites`), the first of
them to be called with a one-token ``x`` on the one-bit plane kernel runs every member in one launch
(``triton_bitplane.bitplane_site_bits``: each member its own view, from its own threshold on the router's gate
values) and keeps the output while ``x`` lives; the others return their columns of it. Anything the one launch
cannot serve (several tokens, slice counting, members at different static views, a threshold held as a float, a
weight override) falls back to each linear's own launch. A CUDA graph captures the one launch.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch


class SiteGroup:
    """Two or three packed :class:`~mobiquant.nn.linear.MoBiLinear` of one input width and slice layout."""

    def __init__(self, members: Sequence[Any]):
        if not 2 <= len(members) <= 3:
            raise ValueError(f"a site group holds 2 or 3 linears, got {len(members)}")
        self.members = list(members)
        self._site: Any = None
        self._src: list[Any] = []
        self._cache: tuple[weakref.ref, tuple, torch.Tensor] | None = None

    def clear(self) -> None:
        self._cache = None

    def buffers(self) -> Any:
        """The members' one-bit plane buffers side by side (built again when a member's buffers change)."""
        from ..kernels.triton_bitplane import site_bitplanes

        parts = [m.bitplane_buffers() for m in self.members]
        if self._site is None or any(a is not b for a, b in zip(parts, self._src, strict=True)):
            self._site = site_bitplanes(parts, [m.bias for m in self.members])
            self._src = parts
        return self._site

    def _ks(self, x: torch.Tensor) -> list[Any] | None:
        """Each member's ``k``: its static view, or a ``RoutedK`` (None: a member the one launch cannot serve;
        ``bitplane_site_bits`` refuses a mix of views it cannot serve in one launch)."""
        from ..kernels.triton_bitplane import RoutedK

        ks = []
        for m in self.members:
            if m.weight_override is not None or m.track or not m.packed:
                return None
            if m.mode == "static" or m.router is None:
                ks.append(m.static_k)
            else:
                k = m._routed_k(x, in_kernel=True)
                if not isinstance(k, RoutedK):  # a float threshold, or threshold fitting: counted per linear
                    return None
                ks.append(k)
        return ks

    def _key(self) -> tuple:
        return tuple(
            (m.mode, m.static_k, id(m.route_tau), getattr(m.route_tau, "_version", None), m.pair_k)
            for m in self.members
        )

    def _span(self, ks: list[Any], config: Any) -> tuple[int, int] | None:
        """The views the routed members' tokens lie in when each member's tokens choose between two adjacent views
        (``MoBiLinear._token_pair``) and the config asks for spans (``SmallConfig.span_bodies``); else None."""
        return None if isinstance(ks[0], int) else self._pair_span(config)

    def _pair_span(self, config: Any) -> tuple[int, int] | None:
        """The views the members' tokens lie in when each member's tokens choose between two adjacent views and the
        config asks for spans (:meth:`_span`, before any member's ``k`` is asked for); else None."""
        from ..kernels.triton_bitplane import spans

        if not spans(config):
            return None
        pairs = [m._token_pair() for m in self.members]
        known = [j for j in pairs if j is not None]
        if len(known) != len(pairs):
            return None
        return min(known), max(known) + 1

    def takes_prologue(self, x: torch.Tensor, config: Any, kind: str = "rms_norm", home_made: bool = False) -> bool:
        """Whether the group's one launch for the one token ``x`` can make its input from ``x`` itself by a prologue
        of ``kind`` (:meth:`output` with a ``prologue``, e.g. the RMS norm before q/k/v): every member at the same
        static view (``MoBiLinear.takes_prologue``, ``home_made`` passed on) on a launch that takes it
        (``triton_bitplane.takes_prologue``)."""
        from ..kernels.triton_bitplane import takes_prologue

        if not all(m.takes_prologue(x, alone=False, kind=kind, home_made=home_made) for m in self.members):
            return False
        return self._one_launch(
            x, config, lambda x2, site, k, span: takes_prologue(x2, site.planes, k, site.outs, config, kind, span)
        )

    def takes_epilogue(self, x: torch.Tensor, config: Any, kind: str) -> bool:
        """Whether the group's one launch for the one token ``x`` fills a
        :class:`~mobiquant.kernels.epilogue.NextInput` of ``kind`` (e.g. gate and up: their product) itself: every
        member at the same static view on a launch that makes it (``triton_bitplane.takes_epilogue``)."""
        from ..kernels.triton_bitplane import takes_epilogue

        if not all(m.takes_epilogue(x, kind, alone=False) for m in self.members):
            return False
        return self._one_launch(
            x, config, lambda x2, site, k, span: takes_epilogue(x2, site.planes, k, site.outs, config, kind, span)
        )

    def _one_launch(self, x: torch.Tensor, config: Any, ask: Any) -> bool:
        """``ask(x2, site buffers, k, span)`` where every member is at the one static view ``k`` (span None), or
        every member is routed, its view read on the device (``k`` None, within the group's span when known: no
        member's router asked for its decisions here); else False."""
        if all(m.decodes_static for m in self.members):
            ks = self._ks(x)
            return ks is not None and len(set(ks)) == 1 and bool(ask(x.reshape(1, -1), self.buffers(), ks[0], None))
        if any(m.decodes_static for m in self.members):
            return False
        return bool(ask(x.reshape(1, -1), self.buffers(), None, self._pair_span(config)))

    def output(
        self, member: Any, x: torch.Tensor, config: Any, prologue: Any = None, epilogue: Any = None
    ) -> torch.Tensor | None:
        """``member``'s output for the one token ``x`` from the group's one launch, or None (its own launch);
        ``prologue``: what makes the members' input from ``x``, made in the launch (:meth:`takes_prologue`);
        ``epilogue``: a :class:`~mobiquant.kernels.epilogue.NextInput` filled from the group's outputs (the members'
        side by side), by the launch where it can (:meth:`takes_epilogue`), else here (a launch is then made
        even where one made the outputs before)."""
        from ..kernels.triton_bitplane import bitplane_site_bits

        made = None if prologue is None else tuple(id(p) if torch.is_tensor(p) else p for p in prologue)
        key = (*self._key(), config, made)
        entry = self._cache
        if epilogue is None and entry is not None and entry[0]() is x and entry[1] == key:
            y = entry[2]
        else:
            ks = self._ks(x)
            if ks is None:
                return None
            site = self.buffers()
            in_launch = epilogue is not None and self.takes_epilogue(x, config, epilogue.kind)
            try:
                y = bitplane_site_bits(
                    x.reshape(1, -1),
                    site,
                    ks,
                    config=config,
                    span=self._span(ks, config),
                    prologue=prologue,
                    epilogue=epilogue if in_launch else None,
                )
            except ValueError:  # views, a layout or a config the one launch does not cover: each linear its own
                return None
            if epilogue is not None and not in_launch:
                epilogue.make(y)
            self._cache = (weakref.ref(x), key, y)
        i = self.members.index(member)
        c, n = self._site.cols[i], self._site.outs[i]
        return y[:, c : c + n].reshape(*x.shape[:-1], n)
