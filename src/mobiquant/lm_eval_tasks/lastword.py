"""Last-word prediction examples (LAMBADA-style) from WikiText-2 test paragraphs.

lm-eval imports this file by path (``!function lastword.wikitext2_lastword`` in the task YAML), not as
part of the ``mobiquant`` package, so it imports nothing from it.

One example per paragraph (a non-empty, non-heading line of ``wiki.test.raw``): among the sentence ends
(a ``.``, ``!`` or ``?`` token) whose preceding word is alphabetic, take the last one that leaves the
context between ``min_words`` and ``max_words`` words; the context is the paragraph up to that word,
the target is the word (with its leading space, as in LAMBADA). Paragraphs with no such sentence end
are skipped. The text keeps WikiText's tokenisation (spaces around punctuation, ``@-@``), as the
perplexity protocol does.
"""

from __future__ import annotations

import os
from pathlib import Path

SENTENCE_ENDS = frozenset({".", "!", "?"})


def is_heading(line: str) -> bool:
    s = line.strip()
    return s.startswith("=") and s.endswith("=")


def is_word(token: str) -> bool:
    return token.isascii() and token.isalpha()


def paragraph_example(paragraph: str, min_words: int = 16, max_words: int = 192) -> dict | None:
    """``{"context", "target"}`` for one paragraph, or None when it has no usable sentence end."""
    words = paragraph.split()
    for i in range(min(len(words) - 1, max_words), min_words, -1):
        if words[i] in SENTENCE_ENDS and is_word(words[i - 1]):
            return {"context": " ".join(words[: i - 1]), "target": " " + words[i - 1]}
    return None


def lastword_examples(text: str, min_words: int = 16, max_words: int = 192) -> list[dict]:
    """Every example of ``text`` (one paragraph per line), in file order."""
    if not 0 < min_words < max_words:
        raise ValueError(f"need 0 < min_words < max_words, got min_words={min_words}, max_words={max_words}")
    out = []
    for n, line in enumerate(text.splitlines()):
        if not line.strip() or is_heading(line):
            continue
        ex = paragraph_example(line, min_words, max_words)
        if ex is not None:
            out.append({**ex, "paragraph": n})
    return out


def read_text(path: str | os.PathLike | None, key: str) -> str:
    if path is None:
        raise ValueError(
            f"this task is built from a local text file: pass its path as task metadata {key!r} "
            f'(lm-eval CLI: --metadata \'{{"{key}": "../shared/data/wikitext-2-raw/wiki.test.raw"}}\'; '
            "mobiquant task=lm_eval: lm_eval.data.*)"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: text file {path} does not exist")
    return path.read_text(encoding="utf-8")


def wikitext2_lastword(wikitext2_path: str | None = None, min_words: int = 16, max_words: int = 192, **_):
    """The ``custom_dataset`` of task ``wikitext2_lastword``: a ``DatasetDict`` with one ``test`` split.

    lm-eval calls it with the task's metadata and ``dataset_kwargs`` as keyword arguments.
    """
    import datasets

    docs = lastword_examples(read_text(wikitext2_path, "wikitext2_path"), min_words, max_words)
    if not docs:
        raise ValueError(f"{wikitext2_path} gave no last-word examples (min_words={min_words}, max_words={max_words})")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
