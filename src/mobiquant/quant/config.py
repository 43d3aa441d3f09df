"""``MoBiConfig``: everything that shapes a MoBiQuant model (saved with every checkpoint)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from .slicer import check_anchor_bits, check_slice_bits

__all__ = ["MoBiConfig"]


#: Where routers sit (:attr:`MoBiConfig.router_placement`).
PLACEMENTS = ("site", "linear", "sublayer", "attention", "block")
#: The placements where a later linear borrows the decisions of its sublayer's first router.
BORROWING = ("sublayer", "attention", "block")


@dataclass
class MoBiConfig:
    """Everything that shapes a MoBiQuant model (saved with every checkpoint)."""

    slice_bits: Sequence[int] = (2, 2, 2, 2)
    group_size: int = 128
    lwc_init: float | None = 4.0
    router_hidden: int = 64
    # "site": one router per shared input; "linear": one per linear; "sublayer": one per sublayer (attention, MLP):
    # the router of its first input (q/k/v's; gate/up's) also decides for the sublayer's later linear (o; down);
    # "attention": so for the attention sublayer only (o on q/k/v's router), the MLP's inputs a router each;
    # "block": one router a block, q/k/v's, whose decisions on the block's input every later linear takes
    router_placement: str = "site"
    router_temperature: float = 1.0
    router_policy: str = "free"  # "free": any number of slices per token; "adjacent": the two views around the budget
    routers: bool = True  # False: multi-slice weights without routers (static views only, e.g. matryoshka)
    skip: Sequence[str] = field(default_factory=list)  # regexes on full module names to keep in FP
    word_bits: int = 32
    anchor_bits: int | None = None  # None: the base slice's own grid (paper); a view's bits: that view is RTN-exact
    # False: one fp16 step and zero point per group shared by every view (paper); True: each view reads the same
    # codes with a step and zero point of its own, fitted when the layer is packed (MoBiLinear.freeze)
    view_steps: bool = False

    def __post_init__(self):
        self.slice_bits = tuple(check_slice_bits(self.slice_bits))
        self.anchor_bits = check_anchor_bits(self.anchor_bits, self.slice_bits)
        if self.router_placement not in PLACEMENTS:
            raise ValueError(f"router_placement must be one of {PLACEMENTS}, got {self.router_placement!r}")
        from ..nn.router import POLICIES  # the router owns its policies; imported late (nn imports quant)

        if self.router_policy not in POLICIES:
            raise ValueError(f"router_policy must be one of {POLICIES}, got {self.router_policy!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        self.skip = list(self.skip)
        if not isinstance(self.view_steps, bool):
            raise ValueError(f"view_steps must be true or false, got {self.view_steps!r}")

    @property
    def min_bits(self) -> int:
        return self.slice_bits[0]

    @property
    def max_bits(self) -> int:
        return sum(self.slice_bits)

    @property
    def view_bits(self) -> tuple[int, ...]:
        """Code bits of the static views ``k = 1..len(slice_bits)``: the prefix sums of ``slice_bits``."""
        return tuple(accumulate(self.slice_bits))

    def to_dict(self) -> dict:
        return {
            "slice_bits": list(self.slice_bits),
            "group_size": self.group_size,
            "lwc_init": self.lwc_init,
            "router_hidden": self.router_hidden,
            "router_placement": self.router_placement,
            "router_temperature": self.router_temperature,
            "router_policy": self.router_policy,
            "routers": self.routers,
            "skip": list(self.skip),
            "word_bits": self.word_bits,
            "anchor_bits": self.anchor_bits,
            "view_steps": self.view_steps,
        }
