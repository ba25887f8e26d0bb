"""data/wikitext.py: WikiText -> llm.c token files for evaluation, detokenized as the GPT-2 paper did.

The detokenizer's expected outputs are written by hand; the article and word counts of the real
WikiText-2 are its published figures (60 articles in valid and in test; 217,646 and 245,569
tokens counting one <eos> per line, Merity et al. 2016)."""

import os

import pytest

from conftest import load_data_script, shared_file
from test_data import check_shard_header, ok, split_at_eot


@pytest.fixture(scope="module")
def wikitext():
    return load_data_script("wikitext")


@pytest.mark.parametrize("tokenized, text", [
    (" The film 's budget was $ 15 @,@ 000 @.@ 5 million , and it did n't stop . ",
     "The film's budget was $ 15,000.5 million, and it didn't stop."),
    (" A well @-@ known ( and loved ) band ; its \" Greatest Hits \" sold : 50 % . ",
     "A well-known (and loved) band; its \"Greatest Hits\" sold: 50%."),
    (" The players ' union [ 1 ] asked : why ? Nobody knew ! ", "The players' union [1] asked: why? Nobody knew!"),
    (" = = = 2006 – present = = = ", "=== 2006 – present ==="),
    (" = Robert <unk> = ", "= Robert <unk> ="),
    (" ", ""),
])
def test_detokenize(wikitext, tokenized, text):
    assert wikitext.detokenize_line(tokenized) == text


def test_articles(wikitext):
    lines = [" ", " = First = ", " ", " Text one . ", " = = Part = = ", " ", " More . ", " ",
             " = Not a title = ", " as no blank line follows . ", " ", " = Second = ", " ", " Text two . ", " "]
    arts = wikitext.articles(lines)
    assert [wikitext.title_of(a) for a in arts] == ["First", "Second"]
    assert wikitext.article_text(arts[0]) == ("= First =\n\nText one.\n== Part ==\n\nMore.\n\n"
                                              "= Not a title =\nas no blank line follows.")
    assert wikitext.article_text(arts[1], keep_tokenization=True) == "= Second =\n\nText two ."
    # words line by line: 0 3 0 3 5 0 2 0 5 6 0 3 0 3 0 = 30, and one <eos> for each of the 15 lines
    assert wikitext.word_count(lines) == 30 + 15


def test_real_wikitext2(wikitext, run_script, enc, shared_data, tmp_path):
    folder = os.path.dirname(shared_file(shared_data, "wikitext-2/test.txt"))
    for split, words in (("valid", 217_646), ("test", 245_569)):
        lines = open(os.path.join(folder, f"{split}.txt"), encoding="utf-8").read().split("\n")[:-1]
        assert len(wikitext.articles(lines)) == 60, split
        assert wikitext.word_count(lines) == words, split
    out = tmp_path / "out"
    proc = ok(run_script("wikitext.py", "--input", folder, "--out", out))
    docs = {s: split_at_eot(check_shard_header(out / f"wikitext2_{s}.bin")) for s in ("val", "test")}
    assert len(docs["val"]) == 60 and len(docs["test"]) == 60
    first = enc.decode(docs["test"][0].tolist())
    assert first.startswith("= Robert <unk> =\n\nRobert <unk> is an English film, television and theatre actor. "
                            "He had a guest-starring role on the television series The Bill in 2000.")
    ntok = sum(d.size + 1 for d in docs["test"])
    assert f"245,569 words (WikiText's count, one <eos> per line), {ntok:,} GPT-2 tokens: " \
           f"word-level perplexity = exp(loss * {ntok / 245569:.4f})" in proc.stdout
    assert os.path.exists(out / "gpt2_tokenizer.bin")


def test_bad_inputs(run_script, tmp_path):
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / "valid.txt").write_text(" \n = A = \n \n Text . \n")
    p = run_script("wikitext.py", "--input", tmp_path / "wt", "--out", tmp_path / "o")
    assert p.returncode == 1 and "no test.txt or wiki.test.tokens for the test split" in p.stderr
    assert not os.path.exists(tmp_path / "o" / "wikitext2_val.bin"), "nothing is written when a split is missing"
    p = run_script("wikitext.py", "--input", tmp_path / "wt", "--out", tmp_path / "o", "--splits", "val,dev")
    assert p.returncode == 2 and "unknown split dev" in p.stderr
    p = ok(run_script("wikitext.py", "--input", tmp_path / "wt", "--out", tmp_path / "o", "--splits", "val"))
    assert "val: 1 article from" in p.stdout and os.path.exists(tmp_path / "o" / "wikitext2_val.bin")
