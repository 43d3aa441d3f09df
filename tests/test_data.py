"""Tests of mobiquant.io.data: corpora, tokenization and windows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from mobiquant.io import data
from mobiquant.io.data import (
    CORPORA,
    CorpusNotAvailableError,
    calibration_windows,
    clean_wiki_markup,
    corpus_joiner,
    eval_windows,
    held_out_windows,
    load_corpus,
    tokenize_corpus,
    wiki_extract_articles,
    wiki_split_of,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAS_GENSIM = importlib.util.find_spec("gensim") is not None


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


# ------------------------------------------------------------------------------------------------
# Registry and text_files
# ------------------------------------------------------------------------------------------------


def test_unknown_corpus_lists_known_names():
    with pytest.raises(ValueError) as info:
        load_corpus("wikitext103")
    for name in ("wiki_extract", "text_files", "wikitext2", "ptb", "c4"):
        assert name in str(info.value)


def test_registry_joiners():
    assert set(CORPORA) == {"wiki_extract", "text_files", "wikitext2", "ptb", "c4"}
    assert corpus_joiner("wikitext2") == "\n\n" and corpus_joiner("ptb") == " "


def test_text_files_one_document_per_nonempty_line(tmp_path):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text(" = Title = \n\nfirst line\n   \nsecond line\n", encoding="utf-8")
    b.write_text("third, ünïcode\n", encoding="utf-8")
    assert load_corpus("text_files", paths=[a, str(b)]) == [
        " = Title = ",
        "first line",
        "second line",
        "third, ünïcode",
    ]
    assert load_corpus("text_files", paths=b, split="eval", cache_dir=tmp_path) == ["third, ünïcode"]


def test_text_files_missing_file_names_path(tmp_path):
    missing = tmp_path / "no" / "such.txt"
    with pytest.raises(FileNotFoundError, match="such.txt"):
        load_corpus("text_files", paths=[missing])


def test_text_files_needs_paths_and_valid_split(tmp_path):
    with pytest.raises(ValueError, match="paths"):
        load_corpus("text_files")
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(ValueError, match="calib, eval, all"):
        load_corpus("text_files", paths=[tmp_path / "a.txt"], split="test")


def test_text_files_name_the_file_that_is_not_text(tmp_path):
    """A Latin-1 or binary file, or files with no text: a message naming the file, not a UnicodeDecodeError
    or "Nothing to tokenize"."""
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text: byte 0xe9") as e:
        load_corpus("text_files", paths=[latin])
    assert not isinstance(e.value, UnicodeDecodeError)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n")
    with pytest.raises(ValueError, match=r"blank.txt hold no text \(empty or whitespace only\)"):
        load_corpus("text_files", paths=[blank])


def test_paths_rejected_for_other_corpora():
    with pytest.raises(ValueError, match="text_files"):
        load_corpus("wiki_extract", paths=["x.txt"])


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "c4"])
def test_hub_corpus_unreachable_suggests_text_files(monkeypatch, name):
    monkeypatch.setattr(data, "hub_offline", lambda: False)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(CorpusNotAvailableError, match="text_files"):
        load_corpus(name, split="eval")


def test_hub_corpus_unknown_split():
    with pytest.raises(ValueError, match="Unknown split"):
        load_corpus("wikitext2", split="dev")


# ------------------------------------------------------------------------------------------------
# wiki_extract
# ------------------------------------------------------------------------------------------------


def test_clean_wiki_markup():
    raw = (
        "{{Infobox thing|name=x}}\n"
        "'''Aardvark''' is a [[mammal|burrowing mammal]] native to [[Africa]].<ref>A source</ref>\n"
        "\n"
        "== Taxonomy ==\n"
        "It   is the only living species of  the order Tubulidentata.\n"
        "== See also ==\n"
        "[[Category:Mammals]]\n"
    )
    text = clean_wiki_markup(raw)
    assert text.splitlines() == [
        "Aardvark is a burrowing mammal native to Africa.",
        "Taxonomy",
        "It is the only living species of the order Tubulidentata.",
    ]


@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory):
    if not HAS_GENSIM:
        pytest.skip("gensim is not installed (pip install gensim): the wiki_extract corpus lives in its wheel")
    cache = tmp_path_factory.mktemp("mobiquant-cache")
    wiki_extract_articles(cache_dir=cache)  # parse once for the whole module
    return cache


def test_wiki_extract_splits_are_disjoint_and_cover_everything(wiki_cache):
    calib = load_corpus("wiki_extract", split="calib", cache_dir=wiki_cache, with_titles=True)
    evals = load_corpus("wiki_extract", split="eval", cache_dir=wiki_cache, with_titles=True)
    everything = load_corpus("wiki_extract", split="all", cache_dir=wiki_cache, with_titles=True)
    calib_titles = {a.title for a in calib}
    eval_titles = {a.title for a in evals}
    assert not calib_titles & eval_titles
    assert calib_titles | eval_titles == {a.title for a in everything}
    assert not {a.text for a in calib} & {a.text for a in evals}
    assert len(everything) == len(calib) + len(evals)
    # Non-trivial sizes: real articles, several hundred thousand characters in each split.
    assert len(calib) >= 50 and len(evals) >= 10
    assert sum(len(a.text) for a in calib) > 1_000_000
    assert sum(len(a.text) for a in evals) > 100_000
    assert all(len(a.text) >= data.WIKI_MIN_CHARS for a in everything)
    assert all(wiki_split_of(a.title) == "eval" for a in evals)


def test_wiki_extract_text_is_clean_prose(wiki_cache):
    docs = load_corpus("wiki_extract", split="all", cache_dir=wiki_cache)
    assert all(isinstance(d, str) for d in docs)
    joined = "\n".join(docs)
    for markup in ("[[", "]]", "{{", "}}", "'''", "<ref", "&amp;"):
        assert markup not in joined, markup
    assert "Einstein" in joined  # case is kept
    assert joined.count(".") > 10_000  # and punctuation


def test_wiki_extract_is_cached_atomically(wiki_cache):
    files = list((wiki_cache / "corpora").iterdir())
    assert len(files) == 1 and files[0].suffix == ".jsonl"
    assert not [f for f in files if ".tmp-" in f.name]
    first = wiki_extract_articles(cache_dir=wiki_cache)
    assert first == wiki_extract_articles(cache_dir=wiki_cache)


def test_wiki_split_is_deterministic():
    assert wiki_split_of("Albert Einstein") == wiki_split_of("Albert Einstein")
    assert wiki_split_of("anything", eval_fraction=0.0) == "calib"
    assert wiki_split_of("anything", eval_fraction=1.0) == "eval"
    shares = [wiki_split_of(f"title {i}") == "eval" for i in range(2000)]
    assert 0.15 < sum(shares) / len(shares) < 0.25


# ------------------------------------------------------------------------------------------------
# Tokenization and windows
# ------------------------------------------------------------------------------------------------


def test_tokenize_corpus_joins_then_tokenizes_once():
    tok = word_tokenizer(["a", "b", "c", "|"])
    ids = tokenize_corpus(["a b", "c"], tok, joiner=" | ")
    assert ids.dtype == torch.long and ids.shape == (1, 4)
    assert ids.tolist() == [[1, 2, 4, 3]]
    assert tokenize_corpus("a b c", tok).tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="empty"):
        tokenize_corpus([], tok)


def test_calibration_windows_shape_and_content():
    ids = torch.arange(1000).unsqueeze(0)
    win = calibration_windows(ids, nsamples=8, seqlen=64, seed=1)
    assert win.shape == (8, 64) and win.dtype == torch.long
    # Each window is a contiguous slice that leaves at least one token after it (GPTQ's range).
    assert torch.equal(win - win[:, :1], torch.arange(64).expand(8, 64))
    assert int(win[:, -1].max()) <= 998


def test_calibration_windows_are_seeded():
    ids = torch.arange(5000)
    a = calibration_windows(ids, 16, 32, seed=0)
    assert torch.equal(a, calibration_windows(ids, 16, 32, seed=0))
    assert not torch.equal(a, calibration_windows(ids, 16, 32, seed=1))
    state = torch.random.get_rng_state()
    calibration_windows(ids, 4, 32, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_calibration_windows_short_text():
    ids = torch.arange(100)
    assert calibration_windows(ids, 3, 99, seed=0).shape == (3, 99)  # exactly seqlen + 1 tokens is enough
    with pytest.raises(ValueError, match=r"has 100 tokens.*at least 101"):
        calibration_windows(ids, 3, 100, seed=0)


def test_held_out_windows_share_no_token_with_the_calibration_windows():
    ids = torch.arange(20000)  # token i is position i: overlaps show as shared values
    train = calibration_windows(ids, 24, 128, seed=3)
    held = held_out_windows(ids, 24, 128, seed=3, count=10)
    assert held.shape == (10, 128)
    assert torch.equal(held - held[:, :1], torch.arange(128).expand(10, 128))  # contiguous windows
    assert not set(held.flatten().tolist()) & set(train.flatten().tolist())
    assert len(set(held[:, 0].tolist())) == 10 and held[:, 0].tolist() == sorted(held[:, 0].tolist())
    assert torch.equal(held, held_out_windows(ids, 24, 128, seed=3, count=10))  # deterministic
    assert not torch.equal(held, held_out_windows(ids, 24, 128, seed=4, count=10))  # follows the draw
    with pytest.raises(ValueError, match=r"holds \d+ windows .* fewer than the 1000"):
        held_out_windows(ids, 24, 128, seed=3, count=1000)
    with pytest.raises(ValueError, match="count"):
        held_out_windows(ids, 24, 128, seed=3, count=0)
    every = held_out_windows(ids, 24, 128, seed=3, count=1000, allow_fewer=True)  # all there are
    assert 10 < every.shape[0] < 1000 and not set(every.flatten().tolist()) & set(train.flatten().tolist())
    with pytest.raises(ValueError, match="holds 0 windows"):  # none at all: an error even so
        held_out_windows(torch.arange(300), 40, 128, seed=0, count=1, allow_fewer=True)


def test_eval_windows_non_overlapping_remainder_dropped():
    ids = torch.arange(1050).unsqueeze(0)
    win = eval_windows(ids, 100)
    assert win.shape == (10, 100)
    assert torch.equal(win.reshape(-1), torch.arange(1000))
    assert eval_windows(ids, 100, max_windows=3).shape == (3, 100)
    assert eval_windows(ids[0], 1050).shape == (1, 1050)
    with pytest.raises(ValueError, match="1050 tokens"):
        eval_windows(ids, 2048)
    with pytest.raises(ValueError):
        eval_windows(ids, 100, max_windows=0)


# ------------------------------------------------------------------------------------------------
# The real tokenizer
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wikitext2_token_count_with_smollm2_tokenizer():
    test_file = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} does not exist (the shared evaluation text sits beside the repository)")
    from mobiquant.io.models import ModelNotAvailableError, load_model

    try:
        _, tok = load_model()
    except ModelNotAvailableError as err:
        pytest.skip(str(err))
    ids = tokenize_corpus(load_corpus("text_files", paths=[test_file]), tok, joiner=corpus_joiner("wikitext2"))
    assert ids.shape == (1, 301_948)
    assert tok.bos_token_id is None or int(ids[0, 0]) != tok.bos_token_id  # no BOS is added
    assert eval_windows(ids, 2048).shape == (147, 2048)


def test_byte_tokenizer_table_gives_the_tokenizer_ids():
    """tokenize_corpus maps bytes through the tiny tokenizer's table: the same ids as running it."""
    from mobiquant.tiny import byte_tokenizer

    tok = byte_tokenizer()
    text = bytes(range(256)).decode("latin-1") + " Zürich — 東京 \n\n end"
    fast = data.tokenize_corpus([text, "two"], tok)
    slow = tok("\n\n".join([text, "two"]), return_tensors="pt", verbose=False)["input_ids"]
    assert fast.dtype == torch.long and torch.equal(fast, slow)
