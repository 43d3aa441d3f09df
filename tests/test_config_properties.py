"""Property-based tests of the config validator: any value for the checked keys is either accepted, or
refused with a :class:`ConfigError` naming the offending key; ``validate`` never raises anything else.

An oracle restates each documented rule (docs/RELIABILITY.md) and decides which keys of the drawn config
are invalid; the error message must name one of them. Values reach the config in two ways: assigned to a
composed config (fast, any Python value), and as command-line overrides through Hydra's compose API
(what a user types, parsed by Hydra's grammar).
"""

from __future__ import annotations

import copy
import math
import string

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import ListConfig, OmegaConf, open_dict

from mobiquant.__main__ import CONF_DIR
from mobiquant.tasks.session import ConfigError, validate

# config key -> the fragment an error about it must contain
KEYS = {
    "budget.budgets": "budget.budgets",
    "quant.mobi.slice_bits": "slice_bits",
    "group_size": "group_size",
    "data.calib.nsamples": "data.calib.nsamples",
    "data.calib.seqlen": "data.calib.seqlen",
}
KEEP = object()  # leave the composed value as it is
SETTINGS = settings(max_examples=50, deadline=None, database=None)


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} as inside a run
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="module")
def base():
    return _compose()


# ---------------------------------------------------------------------------- the rules, restated
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _seq(v) -> list | None:
    return list(v) if isinstance(v, (list, tuple, ListConfig)) else None


def invalid_keys(cfg) -> set[str]:
    """Fragments of the keys whose value breaks a documented rule (empty: the config must be accepted)."""
    bad = set()
    budgets = _seq(cfg.budget.budgets)
    if not budgets or not all(_is_num(b) and 1 <= b <= 8 for b in budgets):  # NaN fails the range test
        bad.add("budget.budgets")
    if not (_is_int(cfg.group_size) and cfg.group_size > 0):
        bad.add("group_size")
    if not (_is_int(cfg.data.calib.nsamples) and cfg.data.calib.nsamples > 0):
        bad.add("data.calib.nsamples")
    if not (_is_int(cfg.data.calib.seqlen) and cfg.data.calib.seqlen >= 2):
        bad.add("data.calib.seqlen")
    bits = _seq(cfg.quant.mobi.slice_bits)
    if not bits or not all(_is_int(b) and 1 <= b <= 8 for b in bits) or sum(bits) > 8:
        bad.add("slice_bits")
    elif not bad and not any(bits[0] <= b <= sum(bits) for b in budgets):
        bad.add("budget.budgets")  # every budget outside what these slices can reach
    return bad


def check(cfg) -> None:
    bad = invalid_keys(cfg)
    try:
        validate(cfg)  # any exception other than ConfigError fails the test
    except ConfigError as e:
        assert bad, f"a valid config was refused: {e}"
        assert any(fragment in str(e) for fragment in bad), f"{e!r} names none of {sorted(bad)}"
    else:
        assert not bad, f"invalid {sorted(bad)} accepted"


# ---------------------------------------------------------------------------- values
words = st.text(string.ascii_letters, min_size=1, max_size=6)
floats = st.one_of(st.floats(-4, 12), st.sampled_from([math.nan, math.inf, -math.inf, 1e300]))
scalars = st.one_of(st.integers(-5, 300), floats, st.booleans(), words, st.none())
budgets = st.one_of(
    st.lists(
        st.one_of(
            st.integers(-2, 12),
            st.floats(0, 9).map(lambda x: round(x * 4) / 4),
            floats,
            st.booleans(),
            words,
            st.none(),
        ),
        max_size=6,
    ),
    st.lists(st.sampled_from([2, 2.5, 3, 4, 6, 8]), min_size=1, max_size=4),  # mostly valid grids
    scalars,
)
slice_bits = st.one_of(
    st.lists(st.integers(-1, 9), max_size=5),
    st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=4),  # mostly valid slices
    st.lists(st.one_of(st.integers(0, 9), st.booleans(), floats, words), max_size=4),
    scalars,
)
positive_ish = st.one_of(st.integers(-3, 200), st.sampled_from([1, 2, 16, 32, 64]), scalars)
draws = st.fixed_dictionaries(
    {
        "budget.budgets": st.one_of(st.just(KEEP), budgets),
        "quant.mobi.slice_bits": st.one_of(st.just(KEEP), slice_bits),
        "group_size": st.one_of(st.just(KEEP), positive_ish),
        "data.calib.nsamples": st.one_of(st.just(KEEP), positive_ish),
        "data.calib.seqlen": st.one_of(st.just(KEEP), positive_ish),
    }
)


@SETTINGS
@given(values=draws)
def test_validate_accepts_or_names_the_offending_key(base, values):
    cfg = copy.deepcopy(base)
    for key, value in values.items():
        if value is not KEEP:
            OmegaConf.update(cfg, key, value, merge=False)
    check(cfg)


SINGLE = {
    "budget.budgets": budgets,
    "quant.mobi.slice_bits": slice_bits,
    "group_size": positive_ish,
    "data.calib.nsamples": positive_ish,
    "data.calib.seqlen": positive_ish,
}


@pytest.mark.parametrize("key", sorted(SINGLE))
def test_a_single_bad_value_is_named(base, key):
    """Only ``key`` changed: a refusal must name ``key`` itself (or the budgets, when slices that are
    valid on their own reach none of them)."""

    @settings(max_examples=30, deadline=None, database=None)
    @given(value=SINGLE[key])
    def single(value):
        cfg = copy.deepcopy(base)
        OmegaConf.update(cfg, key, value, merge=False)
        assert invalid_keys(cfg) <= {KEYS[key], "budget.budgets"}
        check(cfg)

    single()


def _literal(v) -> str:
    """``v`` as Hydra's override grammar writes it."""
    if isinstance(v, list):
        return "[" + ",".join(_literal(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return str(v)


@settings(max_examples=20, deadline=None, database=None)
@given(values=draws)
def test_command_line_overrides_are_accepted_or_name_the_offending_key(values):
    overrides = [f"{key}={_literal(v)}" for key, v in values.items() if v is not KEEP]
    check(_compose(overrides))  # the oracle reads the values back as Hydra parsed them


def test_oracle_sees_both_outcomes(base):
    """The oracle is not vacuous: the shipped config is valid, and each rule rejects a value of its own."""
    assert invalid_keys(base) == set()
    validate(base)
    for key, value in [
        ("budget.budgets", [2, 9]),
        ("quant.mobi.slice_bits", 4),
        ("group_size", True),
        ("data.calib.nsamples", 0),
        ("data.calib.seqlen", 1),
        ("quant.mobi.slice_bits", [1]),
    ]:
        cfg = copy.deepcopy(base)
        OmegaConf.update(cfg, key, value, merge=False)
        assert invalid_keys(cfg), (key, value)
        check(cfg)
