"""WikiText-2 (or WikiText-103) -> llm.c token files for evaluation: wikitext2_val.bin, wikitext2_test.bin.

    python data/wikitext.py --input ../shared/data/wikitext-2      # its valid.txt and test.txt
    python data/wikitext.py                                        # Salesforce/wikitext from the hub
    python data/wikitext.py --version 103 --splits test
    ./train_gpt2 -e model.bin -x 0 -j data/wikitext/wikitext2_test.bin -m -1 -b 1 -t 1024

--input is a folder with {valid,test,train}.txt or wiki.{valid,test,train}.tokens: WikiText's
tokenized release ("wikitext-2-v1": <unk> for rare words, spaces around punctuation, @-@ for
hyphens). Without --input it is downloaded from the Hugging Face hub (Salesforce/wikitext,
config wikitext-2-v1 or wikitext-103-v1; needs `pip install datasets`).

Each article (from its " = Title = " line, which has a blank line before and after it, to the
next) is one document, led by EOT as in every shard here. The text is detokenized, as the GPT-2
paper evaluated WikiText: spaces before punctuation and inside brackets and quotes removed,
" @-@ " -> "-", " @,@ " -> ",", " @.@ " -> ".", "n 't" -> "n't", headings " = = H = = " -> "== H ==";
<unk> stays. --keep_tokenization writes the text as it is.

Perplexity. `-x 0 -m -1` gives the mean loss per GPT-2 token over every full B*T window of the
file (the part of the last window that does not fill B*T tokens is not scored; -b 1 -t 1024
leaves out less than 1024 tokens). WikiText's published perplexities are per word, where a
word is one of its whitespace-separated tokens and every line adds one <eos> (245,569 in
WikiText-2 test, 217,646 in valid): the script prints each split's GPT-2 token and word counts,
and word-level perplexity = exp(loss * tokens / words).

Output in --out (default data/wikitext/): wikitext{2,103}_{val,test[,train]}.bin and
gpt2_tokenizer.bin. Offline, set TIKTOKEN_CACHE_DIR to a folder with the GPT-2 BPE cache.
"""

import argparse
import os
import re
import sys

import numpy as np

from common import DataError, comma_list, get_tokenizer, run_main, write_splits

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("val", "test", "train")
FILES = {"val": ("valid.txt", "wiki.valid.tokens"), "test": ("test.txt", "wiki.test.tokens"),
         "train": ("train.txt", "wiki.train.tokens")}
HUB_SPLIT = {"val": "validation", "test": "test", "train": "train"}

_TITLE = re.compile(r"^ = ([^=].*) = $")
_HEADING = re.compile(r"^(=(?: =)*) (.*?) (=(?: =)*)$")


def is_blank(line):
    return line.strip() == ""


def articles(lines):
    """Splits WikiText's lines (newlines stripped) into articles: lists of lines, each starting
    at a title line " = Title = " that has a blank line (or the start) before it and a blank
    line after it. Lines before the first title join the first article."""
    arts, cur = [], []
    for i, line in enumerate(lines):
        title = (_TITLE.match(line) and (i == 0 or is_blank(lines[i - 1])) and i + 1 < len(lines)
                 and is_blank(lines[i + 1]))
        if title and any(not is_blank(x) for x in cur):
            arts.append(cur)
            cur = []
        cur.append(line)
    if any(not is_blank(x) for x in cur):
        arts.append(cur)
    return arts


def title_of(article):
    """The article's title, detokenized ("American Beauty ( 1999 film )" -> "American Beauty (1999 film)")."""
    for line in article:
        m = _TITLE.match(line)
        if m:
            return detokenize_line(m.group(1))
    return ""


def word_count(lines):
    """WikiText's own token count: whitespace-separated words plus one <eos> per line."""
    return sum(len(line.split()) + 1 for line in lines)


def detokenize_line(s):
    """One line of WikiText's tokenized text as ordinary text."""
    s = s.strip()
    m = _HEADING.match(s)
    if m and m.group(1) == m.group(3):  # " = = Career = = " -> "== Career =="
        level = m.group(1).count("=")
        return "=" * level + " " + detokenize_line(m.group(2)) + " " + "=" * level
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" (n't|'t|'s|'re|'ve|'ll|'d|'m|')(?= |$)", r"\1", s)   # "do n't" "John 's" "players '"
    s = re.sub(r"([(\[{]) ", r"\1", s)
    s = re.sub(r" ([)\]}])", r"\1", s)
    s = re.sub(r'" ([^"]*?) "', r'"\1"', s)                        # quoted spans, pairwise
    s = re.sub(r" ([.,;:!?%])(?= |$|[)\]}\"])", r"\1", s)
    return s


def article_text(article, keep_tokenization=False):
    """The article as one document: lines joined with newlines, blank lines kept (they separate
    paragraphs), leading and trailing blank lines dropped."""
    lines = [line.strip() if keep_tokenization else detokenize_line(line) for line in article]
    return "\n".join(lines).strip("\n")


def split_lines_local(folder, split):
    for name in FILES[split]:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            try:
                with open(p, encoding="utf-8", newline="") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: not valid UTF-8 ({e})") from e
            lines = text.split("\n")
            return p, lines[:-1] if lines[-1] == "" else lines
    raise DataError(f"{folder}: no {' or '.join(FILES[split])} for the {split} split; "
                    "give the folder of WikiText's tokenized release, or leave the split out with --splits")


def split_lines_hub(version, split):
    config = f"wikitext-{version}-v1"
    try:
        import datasets
    except ImportError as e:
        raise DataError("downloading WikiText needs the Hugging Face `datasets` package: pip install datasets\n"
                        "(or pass the folder of its files with --input PATH)") from e
    try:
        ds = datasets.load_dataset("Salesforce/wikitext", config, split=HUB_SPLIT[split])
    except Exception as e:
        raise DataError(f"could not load Salesforce/wikitext ({config}) from the hub ({type(e).__name__}: {e}); "
                        "pass local files with --input PATH") from e
    # one row per line of the original file, its newline included
    return f"Salesforce/wikitext ({config}) {HUB_SPLIT[split]}", [row["text"].rstrip("\n") for row in ds]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="folder with WikiText's {valid,test}.txt or wiki.{valid,test}.tokens "
                                    "(default: download from the Hugging Face hub)")
    ap.add_argument("--version", choices=["2", "103"], default="2", help="WikiText-2 or WikiText-103 (default 2)")
    ap.add_argument("--splits", type=comma_list(SPLITS, "split"), default=["val", "test"], help="comma-separated, of val,test,train (default val,test)")
    ap.add_argument("--keep_tokenization", action="store_true", help="write WikiText's tokenized text as it is")
    ap.add_argument("--out", default=os.path.join(HERE, "wikitext"), help="output folder (default data/wikitext)")
    args = ap.parse_args()
    if args.input is not None and not os.path.isdir(args.input):
        raise DataError(f"--input must be the folder holding WikiText's files: {args.input}")
    tok = get_tokenizer("gpt2")
    splits, counts = [], []
    for split in args.splits:
        where, lines = split_lines_local(args.input, split) if args.input else split_lines_hub(args.version, split)
        arts = articles(lines)
        if not arts:
            raise DataError(f"{where}: no text in it")
        docs = [tok.encode(article_text(a, args.keep_tokenization)) for a in arts]
        toks = np.concatenate([np.array([tok.eot] + d, dtype=np.uint16) for d in docs])
        splits.append((split, toks))
        counts.append((split, where, len(arts), word_count(lines), int(toks.size)))
    write_splits(args.out, f"wikitext{args.version}", splits, tok)
    for split, where, narts, words, ntok in counts:
        print(f"{split}: {narts} article{'s' if narts != 1 else ''} from {where}; {words:,} words (WikiText's count, one <eos> per line), "
              f"{ntok:,} GPT-2 tokens: word-level perplexity = exp(loss * {ntok / words:.4f})")


if __name__ == "__main__":
    sys.exit(run_main(main))
