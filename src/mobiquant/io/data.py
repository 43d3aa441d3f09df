"""Text corpora for calibration and evaluation, tokenization, and the windows the protocols cut from it.

Corpora are registered in :data:`CORPORA` and loaded with :func:`load_corpus`, which returns a list of
documents (strings):

``wiki_extract`` (offline default)
    The real English Wikipedia extract that ships inside the ``gensim`` wheel (106 articles after
    redirects are skipped). Markup is stripped, the articles are cleaned and split *by article* into a
    calibration and an evaluation part with a hash of the title, so the two never share an article.
    The cleaned text is cached once under ``<cache>/corpora/``.
``text_files``
    Local UTF-8 files, one document per non-empty line (e.g. ``../shared/data/wikitext-2-raw/wiki.test.raw``).
``wikitext2``, ``ptb``, ``c4``
    The usual GPTQ/OmniQuant benchmark corpora through the optional ``datasets`` package, where it is
    installed and the Hugging Face Hub can be reached (or its cache is used offline).

Every corpus has a preferred joiner (:func:`corpus_joiner`), the string that the GPTQ protocol puts between
documents before the text is tokenized once (:func:`tokenize_corpus`). Token ids are then cut into random
calibration windows (:func:`calibration_windows`) or consecutive, non-overlapping evaluation windows
(:func:`eval_windows`).
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write_text
from .models import cache_root, hub_offline, hub_reachable

__all__ = [
    "CORPORA",
    "SPLITS",
    "CorpusNotAvailableError",
    "CorpusSpec",
    "WikiArticle",
    "calibration_windows",
    "clean_wiki_markup",
    "corpus_joiner",
    "eval_windows",
    "load_corpus",
    "load_text_files",
    "load_wiki_extract",
    "tokenize_corpus",
    "wiki_extract_articles",
    "wiki_extract_path",
    "wiki_split_of",
]

#: Split names accepted by every corpus: calibration text, evaluation text, or both.
SPLITS = ("calib", "eval", "all")

#: The English Wikipedia extract inside the gensim wheel (relative to the gensim package folder).
WIKI_EXTRACT_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: Bumped whenever :func:`clean_wiki_markup` changes, so that cached cleaned text is rebuilt.
WIKI_CLEAN_VERSION = 1
#: Default share of articles (by title hash) that goes to the ``eval`` split of ``wiki_extract``.
WIKI_EVAL_FRACTION = 0.2
#: Articles shorter than this many characters after cleaning are dropped by default.
WIKI_MIN_CHARS = 500


class CorpusNotAvailableError(RuntimeError):
    """A corpus cannot be loaded here (optional package missing, or its hub out of reach)."""


# --------------------------------------------------------------------------------------------------
# wiki_extract: the Wikipedia sample inside the gensim wheel
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WikiArticle:
    """One cleaned Wikipedia article."""

    title: str
    text: str


def wiki_extract_path() -> Path:
    """Location of the Wikipedia extract shipped in the ``gensim`` wheel, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotAvailableError(
            "The corpus 'wiki_extract' is read from the gensim wheel, and gensim is not installed; "
            "install it with `pip install gensim` (or `pip install mobiquant[corpus]`)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / WIKI_EXTRACT_FILE
        if candidate.is_file():
            return candidate
    raise CorpusNotAvailableError(
        f"gensim is installed but does not contain {WIKI_EXTRACT_FILE}; reinstall it with `pip install gensim`."
    )


_HEADING = re.compile(r"^\s*(={2,6})\s*(.*?)\s*\1\s*$")
_BOLD_ITALIC = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")


def clean_wiki_markup(raw: str, min_line_words: int = 3) -> str:
    """Plain text of an article in MediaWiki markup: one paragraph per line, case and punctuation kept.

    Templates, tables, files, references, links and tags are removed with gensim's ``filter_wiki``. Then
    bold/italic quotes are dropped, section headings (``== History ==``) become plain lines, runs of
    whitespace collapse to one space, and lines that are neither headings nor have at least
    ``min_line_words`` words are dropped (they are leftovers of tables, galleries and image captions).
    """
    from gensim.corpora.wikicorpus import filter_wiki  # imported lazily: gensim is slow to import

    text = filter_wiki(raw)
    kept: list[tuple[str, bool]] = []  # (line, is_heading)
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            line = heading.group(2)
        line = _EMPTY_PARENS.sub("", _BOLD_ITALIC.sub("", line))  # "(named , plural" keeps its words
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line)).strip()
        if not line or line.startswith(("{|", "|", "!")):
            continue
        if heading is None and len(line.split()) < min_line_words:
            continue
        kept.append((line, heading is not None))
    # A heading with no paragraph below it (a section that held only lists of links, say) is noise.
    lines = [
        line for i, (line, is_heading) in enumerate(kept) if not (is_heading and (i + 1 == len(kept) or kept[i + 1][1]))
    ]
    return "\n".join(lines)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _iter_wiki_pages(path: Path) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` for every main-namespace page of a MediaWiki XML dump that is not a redirect."""
    with bz2.open(path, "rb") as stream:
        for _event, elem in ET.iterparse(stream, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem}
            title = (fields["title"].text or "") if "title" in fields else ""
            namespace = (fields["ns"].text or "0") if "ns" in fields else "0"
            text = ""
            revision = fields.get("revision")
            if revision is not None:
                for child in revision:
                    if _local(child.tag) == "text":
                        text = child.text or ""
            redirect = "redirect" in fields or text.lstrip()[:9].upper() == "#REDIRECT"
            elem.clear()
            if namespace.strip() == "0" and not redirect and text.strip():
                yield title, text


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wiki_extract_articles(cache_dir: str | os.PathLike[str] | None = None, refresh: bool = False) -> list[WikiArticle]:
    """All cleaned articles of the gensim Wikipedia extract, in dump order (cached after the first call).

    The cache file ``<cache>/corpora/wiki_extract-v<version>-<sha of source>.jsonl`` holds one JSON object
    (title, text) per line and is written atomically; it is keyed by the source file's digest and the
    cleaning version, so a new gensim or a change of the cleaning code rebuilds it.
    """
    source = wiki_extract_path()
    digest = _file_digest(source)[:16]
    cache_file = cache_root(cache_dir) / "corpora" / f"wiki_extract-v{WIKI_CLEAN_VERSION}-{digest}.jsonl"
    if cache_file.is_file() and not refresh:
        with open(cache_file, encoding="utf-8") as fh:
            return [WikiArticle(**json.loads(line)) for line in fh if line.strip()]
    articles = []
    for title, raw in _iter_wiki_pages(source):
        text = clean_wiki_markup(raw)
        if text:
            articles.append(WikiArticle(title=title, text=text))
    payload = "".join(json.dumps({"title": a.title, "text": a.text}, ensure_ascii=False) + "\n" for a in articles)
    atomic_write_text(cache_file, payload)
    return articles


def wiki_split_of(title: str, eval_fraction: float = WIKI_EVAL_FRACTION) -> str:
    """``"eval"`` or ``"calib"`` for an article, from a stable hash of its title (independent of the rest)."""
    bucket = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") % 10_000
    return "eval" if bucket < round(eval_fraction * 10_000) else "calib"


def load_wiki_extract(
    split: str = "all",
    cache_dir: str | os.PathLike[str] | None = None,
    min_chars: int = WIKI_MIN_CHARS,
    eval_fraction: float = WIKI_EVAL_FRACTION,
    with_titles: bool = False,
) -> list[str] | list[WikiArticle]:
    """Documents (one per article) of the gensim Wikipedia extract for ``split`` in :data:`SPLITS`.

    Articles shorter than ``min_chars`` characters after cleaning are dropped. An article goes to
    ``eval`` when the hash of its title falls in the first ``eval_fraction`` of the buckets, otherwise to
    ``calib``: deterministic, order-independent, and the two splits never overlap.
    """
    _check_split(split)
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    articles = [a for a in wiki_extract_articles(cache_dir) if len(a.text) >= min_chars]
    if split != "all":
        articles = [a for a in articles if wiki_split_of(a.title, eval_fraction) == split]
    return articles if with_titles else [a.text for a in articles]


# --------------------------------------------------------------------------------------------------
# text_files
# --------------------------------------------------------------------------------------------------


def load_text_files(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None, split: str = "all"
) -> list[str]:
    """Every non-empty line of local UTF-8 files, in order, each as one document (line ends removed).

    The files themselves define what they are for (calibration or evaluation), so ``split`` is only
    checked for validity; never pass the same file for both.
    """
    _check_split(split)
    if paths is None:
        raise ValueError("The corpus 'text_files' needs paths=[...] with one or more local UTF-8 text files")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p).expanduser() for p in paths]
    if not paths:
        raise ValueError("The corpus 'text_files' needs at least one path")
    docs: list[str] = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                docs.extend(line.rstrip("\r\n") for line in fh if line.strip())
        except UnicodeDecodeError as e:
            raise ValueError(
                f"Text file {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} cannot be decoded (a binary or "
                "Latin-1 file?); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
    if not docs:
        raise ValueError(f"Text files {', '.join(map(str, paths))} hold no text (empty or whitespace only)")
    return docs


# --------------------------------------------------------------------------------------------------
# Hub corpora through the optional `datasets` package
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HubSource:
    path: str
    config: str | None
    field: str
    splits: dict[str, str]  # our split name -> the dataset's split name
    data_files: dict[str, str] | None = None
    keep_empty: bool = True  # GPTQ joins every row of WikiText-2, empty ones included


_HUB_SOURCES: dict[str, _HubSource] = {
    "wikitext2": _HubSource("wikitext", "wikitext-2-raw-v1", "text", {"calib": "train", "eval": "test"}),
    "ptb": _HubSource("ptb_text_only", "penn_treebank", "sentence", {"calib": "train", "eval": "test"}),
    "c4": _HubSource(
        "allenai/c4",
        None,
        "text",
        {"calib": "train", "eval": "validation"},
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        keep_empty=False,
    ),
}


def _datasets_unavailable(name: str, reason: str) -> CorpusNotAvailableError:
    return CorpusNotAvailableError(
        f"The corpus {name!r} cannot be loaded: {reason}. Use the corpus 'text_files' with a local copy instead, "
        "e.g. load_corpus('text_files', paths=['../shared/data/wikitext-2-raw/wiki.test.raw']), "
        "or the offline default 'wiki_extract'."
    )


def _load_hub_corpus(name: str, split: str = "eval", max_docs: int | None = None, **kwargs: Any) -> list[str]:
    """Rows of a benchmark corpus from the Hugging Face Hub (``split``: calib, eval, all or a native name)."""
    source = _HUB_SOURCES[name]
    native = set(source.splits.values())
    if split == "all":
        wanted = list(dict.fromkeys(source.splits.values()))
    elif split in source.splits:
        wanted = [source.splits[split]]
    elif split in native:
        wanted = [split]
    else:
        raise ValueError(
            f"Unknown split {split!r} for {name!r}; use one of {', '.join(SPLITS + tuple(sorted(native)))}"
        )
    if importlib.util.find_spec("datasets") is None:
        raise _datasets_unavailable(name, "the optional package `datasets` is not installed (`pip install datasets`)")
    offline = hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if not offline and not hub_reachable():
        raise _datasets_unavailable(name, "the Hugging Face Hub cannot be reached")
    import datasets

    docs: list[str] = []
    for native_split in wanted:
        load_kwargs: dict[str, Any] = dict(kwargs)
        if source.data_files is not None:
            load_kwargs["data_files"] = {native_split: source.data_files[native_split]}
        try:
            rows = datasets.load_dataset(source.path, source.config, split=native_split, **load_kwargs)
        except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
            where = (
                "the Hugging Face Hub is switched off and it is not cached"
                if offline
                else f"{type(err).__name__}: {err}"
            )
            raise _datasets_unavailable(name, where) from err
        texts = rows[source.field] if max_docs is None else rows.select(range(min(max_docs, len(rows))))[source.field]
        docs.extend(t for t in texts if source.keep_empty or t.strip())
    return docs


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """A registered corpus: how to load it, the joiner the protocol uses for it, and whether it needs a network."""

    name: str
    loader: Callable[..., list[str]]
    joiner: str
    offline: bool
    description: str


def _no_paths(name: str, paths: Any) -> None:
    if paths is not None:
        raise ValueError(f"The corpus {name!r} takes no paths; use 'text_files' for local files")


# Every loader takes (split, paths, cache_dir, **corpus-specific options).


def _wiki_extract_loader(split: str = "all", paths: Any = None, cache_dir: Any = None, **kwargs: Any) -> list[str]:
    _no_paths("wiki_extract", paths)
    return load_wiki_extract(split, cache_dir=cache_dir, **kwargs)


def _text_files_loader(split: str = "all", paths: Any = None, cache_dir: Any = None, **kwargs: Any) -> list[str]:
    del cache_dir  # local files need no cache
    return load_text_files(paths, split, **kwargs)


def _hub_loader(name: str) -> Callable[..., list[str]]:
    def loader(split: str = "eval", paths: Any = None, cache_dir: Any = None, **kwargs: Any) -> list[str]:
        del cache_dir  # `datasets` keeps its own cache (HF_DATASETS_CACHE)
        _no_paths(name, paths)
        return _load_hub_corpus(name, split, **kwargs)

    loader.__name__ = f"_{name}_loader"
    return loader


CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec(
            "wiki_extract",
            _wiki_extract_loader,
            "\n\n",
            True,
            "English Wikipedia extract shipped in the gensim wheel, split by article into calib/eval (offline default)",
        ),
        CorpusSpec(
            "text_files", _text_files_loader, "\n\n", True, "local UTF-8 files, one document per non-empty line"
        ),
        CorpusSpec(
            "wikitext2",
            _hub_loader("wikitext2"),
            "\n\n",
            False,
            "WikiText-2 raw via `datasets` (calib=train, eval=test)",
        ),
        CorpusSpec(
            "ptb",
            _hub_loader("ptb"),
            " ",
            False,
            "Penn Treebank via `datasets` (calib=train, eval=test); GPTQ joins its sentences with a space",
        ),
        CorpusSpec(
            "c4",
            _hub_loader("c4"),
            " ",
            False,
            "C4 (en) first shards via `datasets` (calib=train, eval=validation); pass max_docs to limit",
        ),
    )
}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}")


def _spec(name: str) -> CorpusSpec:
    try:
        return CORPORA[name]
    except KeyError:
        raise ValueError(f"Unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}") from None


def load_corpus(
    name: str,
    split: str | None = None,
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> list[str]:
    """Documents of the corpus ``name`` (a key of :data:`CORPORA`).

    Args:
        name: ``wiki_extract``, ``text_files``, ``wikitext2``, ``ptb`` or ``c4``.
        split: ``calib``, ``eval`` or ``all`` (hub corpora also take their native split names). ``None``
            means each corpus's default: ``all`` for local corpora, ``eval`` for hub corpora.
        paths: files for ``text_files`` (a path or a list of paths).
        cache_dir: mobiquant cache root (see :func:`mobiquant.io.models.cache_root`); used by
            ``wiki_extract`` for its cleaned text, ignored by the others.
        **kwargs: options of the corpus loader, e.g. ``min_chars``/``eval_fraction``/``with_titles`` for
            ``wiki_extract`` or ``max_docs`` for hub corpora.

    Raises:
        ValueError: unknown corpus or split.
        FileNotFoundError: a file of ``text_files`` does not exist.
        CorpusNotAvailableError: an optional package or the network the corpus needs is missing.
    """
    spec = _spec(name)
    if split is not None:
        kwargs["split"] = split
    return spec.loader(paths=paths, cache_dir=cache_dir, **kwargs)


def corpus_joiner(name: str) -> str:
    """The string that the GPTQ protocol puts between the documents of corpus ``name``."""
    return _spec(name).joiner


# --------------------------------------------------------------------------------------------------
# Tokenization and windows
# --------------------------------------------------------------------------------------------------


def tokenize_corpus(docs: str | Sequence[str], tokenizer: Any, joiner: str = "\n\n") -> torch.Tensor:
    """Join the documents with ``joiner`` and tokenize the text once: a ``LongTensor[1, N]``.

    This is the GPTQ/OmniQuant protocol: the tokenizer's default call on the whole text, so special
    tokens are added exactly when the tokenizer adds them by default. The SmolLM2 (GGUF) tokenizer adds
    none (no BOS); on ``wiki.test.raw`` from ``../shared/data`` this gives 301,948 tokens. Length warnings
    (the text is longer than the model's context) are irrelevant here and silenced.
    """
    if isinstance(docs, str):
        docs = [docs]
    text = joiner.join(docs)
    if not text:
        raise ValueError("Nothing to tokenize: the corpus is empty")
    table = getattr(tokenizer, "byte_table", None)  # a byte vocabulary without merges (mobiquant.tiny)
    if table is not None:
        import numpy as np

        return torch.from_numpy(table[np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]).long().reshape(1, -1)
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    return ids.reshape(1, -1)


def _flat_ids(ids: torch.Tensor) -> torch.Tensor:
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"Expected token ids of shape [1, N] or [N], got {tuple(ids.shape)}")
    return ids.long()


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens: a ``LongTensor[nsamples, seqlen]``.

    As in GPTQ, each window starts at a uniformly random offset in ``[0, N - seqlen - 1]`` (windows may
    overlap). The draw uses its own seeded :class:`torch.Generator`, so it is reproducible and leaves the
    global random state alone.
    """
    flat = _flat_ids(ids)
    starts = _calibration_starts(flat.numel(), nsamples, seqlen, seed)
    offsets = torch.arange(seqlen)
    return flat[starts[:, None] + offsets[None, :]].contiguous()


def _calibration_starts(n: int, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Where :func:`calibration_windows` draws its windows in a text of ``n`` tokens (checked here)."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    if n < seqlen + 1:
        raise ValueError(
            f"The calibration text has {n} tokens; windows of seqlen={seqlen} need at least {seqlen + 1}. "
            "Use more text or a shorter seqlen."
        )
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n - seqlen, (nsamples,), generator=generator)


def held_out_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, count: int, allow_fewer: bool = False
) -> torch.Tensor:
    """``count`` windows of ``seqlen`` tokens of the same text that share no token with the calibration windows
    ``calibration_windows(ids, nsamples, seqlen, seed)``: a ``LongTensor[count, seqlen]``.

    The text outside the calibration windows is cut into consecutive windows (each stretch between two
    calibration windows on its own), and ``count`` of them are taken evenly spread over the text, in order.
    Deterministic. When the text holds fewer than ``count``: all there are with ``allow_fewer`` (at least one),
    else ``ValueError`` naming how many there are.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    flat = _flat_ids(ids)
    n = flat.numel()
    covered = torch.zeros(n, dtype=torch.bool)
    for s in _calibration_starts(n, nsamples, seqlen, seed).tolist():
        covered[s : s + seqlen] = True
    starts, run = [], 0
    for i, c in enumerate(covered.tolist()):
        run = 0 if c else run + 1
        if run == seqlen:  # a whole window of untouched tokens ends here
            starts.append(i - seqlen + 1)
            run = 0
    if allow_fewer and starts:
        count = min(count, len(starts))
    if len(starts) < count:
        raise ValueError(
            f"the calibration text holds {len(starts)} windows of {seqlen} tokens outside its {nsamples} calibration "
            f"windows, fewer than the {count} asked for: use fewer, shorter, or more text"
        )
    pick = torch.linspace(0, len(starts) - 1, count).round().long().tolist()
    chosen = torch.tensor([starts[i] for i in pick])
    return flat[chosen[:, None] + torch.arange(seqlen)[None, :]].contiguous()


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens, remainder dropped: ``LongTensor[n, seqlen]``.

    ``max_windows`` keeps only the first windows (e.g. 16 for quick comparisons).
    """
    if seqlen < 1:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    flat = _flat_ids(ids)
    n = flat.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"The evaluation text has {flat.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return flat[: n * seqlen].reshape(n, seqlen).contiguous()
