"""The local lm-eval task: last-word examples from WikiText-2 paragraphs, registered by include path."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobiquant.lm_eval_tasks import LOCAL_TASKS, TASKS_DIR
from mobiquant.lm_eval_tasks.lastword import lastword_examples, paragraph_example, wikitext2_lastword

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"


def test_target_is_the_last_word_of_the_last_sentence_that_fits():
    words = " ".join(f"w{i}" for i in range(20))  # no sentence end among these
    text = f"{words} first end . {words} second end . tail without a full stop"
    ex = paragraph_example(text, min_words=4, max_words=200)
    assert ex["target"] == " end" and ex["context"].endswith("second")
    # a cap below the second sentence end keeps the first one
    short = paragraph_example(text, min_words=4, max_words=25)
    assert short["context"] == f"{words} first" and short["target"] == " end"


def test_non_words_and_short_paragraphs_give_no_example():
    assert paragraph_example("a b c d e f g h i j k l m n o p q r 1999 .", min_words=4) is None  # number
    assert paragraph_example("a b c d e f g h i j k l m n o p q r @-@ .", min_words=4) is None
    assert paragraph_example("too short here .", min_words=16) is None


def test_headings_and_blank_lines_are_skipped():
    body = " ".join(["word"] * 30) + " final ."
    text = f" = Heading = \n\n {body} \n = = Sub = = \n{body}\n"
    ex = lastword_examples(text)
    assert [e["paragraph"] for e in ex] == [2, 4]
    assert all(e["target"] == " final" for e in ex)
    with pytest.raises(ValueError, match="min_words < max_words"):
        lastword_examples(text, min_words=10, max_words=5)


def test_missing_file_and_missing_metadata_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wikitext2_lastword(str(tmp_path / "none.raw"))
    with pytest.raises(ValueError, match="wikitext2_path"):
        wikitext2_lastword(None)


def test_wikitext2_lastword_dataset_from_shared_data():
    if not WIKI.is_file():
        pytest.skip(f"{WIKI} is not beside the repository")
    ds = wikitext2_lastword(str(WIKI))
    test = ds["test"]
    assert len(test) == 1783  # one example per usable paragraph of the 2,891-line file
    first = test[0]
    assert first["target"] == " Hall" and first["context"].startswith("Robert Boulter is an English film")
    assert all(t.startswith(" ") and t[1:].isalpha() for t in test["target"])
    assert max(len(c.split()) for c in test["context"]) < 192


def test_every_local_task_is_registered_by_include_path():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(LOCAL_TASKS) <= set(tm.all_tasks)
