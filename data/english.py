"""Real English text for longer runs -> llm.c token shards: Wikipedia articles, blog posts and CNN
news stories, interleaved into one dataset.

    python data/english.py --input ../shared/data                  # the local copies (below)
    python data/english.py --input ../shared/data --corpora wikipedia,cnn --vocab char
    python data/english.py --max_docs 200000                       # download from the Hugging Face hub

--input is a folder holding any of
  * wikipedia_en_2015/ (or wikipedia/): WikiExtractor output, files wiki_NN, wiki_NN.xz or
    wiki_NN.bz2 in any sub-folders; one document per <doc ...>...</doc> (title line included).
    Articles whose title is also a WikiText-2 test article are left out, so that a model
    trained here can be evaluated on WikiText-2 (data/wikitext.py) without having seen it;
  * blog_authorship/ (or blogs/): the Blog Authorship Corpus, its <blogger>.xml files or
    .tar(.xz|.gz) archives of them; one document per <post>: UTF-8 or else Windows-1252,
    HTML entities decoded, each line's padding stripped, runs of spaces and of blank lines
    collapsed, empty posts dropped;
  * cnn_stories/ (or cnn/): CNN stories from the DeepMind Q&A data, .story files or
    .tar(.xz|.gz) archives of them; one document per story: the text before its first
    @highlight; a story whose body repeats an earlier one is dropped.
Without --input each corpus is streamed from the Hugging Face hub (needs `pip install datasets`):
wikipedia = wikimedia/wikipedia (20231101.en), blogs = tasksource/blog_authorship_corpus,
cnn = abisee/cnn_dailymail (3.0.0, its "article"; CNN and Daily Mail). Use --max_docs: the
hub's Wikipedia alone is 6.4 million articles, and it keeps WikiText's articles (only the local
copy's overlap is known and left out).

Mixing: the documents of the corpora are interleaved so that each corpus is spread evenly over
the output: the next document always comes from the corpus that has been read least, as a
fraction of its input (bytes for local files; documents for the hub when it says how many, else
one document from each in turn). The validation shard is the first --val_docs documents
(default 2,000: about 1M GPT-2 tokens of the three local corpora, in their proportions), the
train shards follow (--shard_size, default 10M tokens). Output in --out (default data/english/):
english_val_000000.bin, english_train_000001.bin, ... and gpt2_tokenizer.bin (--vocab char:
english_char_*.bin and char_tokenizer.bin; documents with a character outside the 96 symbols
are dropped, see data/openwebtext.py --help).

Offline, set TIKTOKEN_CACHE_DIR to a folder with the GPT-2 BPE cache.
"""

import argparse
import hashlib
import html
import lzma
import os
import re
import sys
import tarfile

from common import (DataError, HFSource, add_shard_args, comma_list, open_decompressed, run_main, tar_stream_mode,
                    write_text_dataset)

HERE = os.path.dirname(os.path.abspath(__file__))
CORPORA = ("wikipedia", "blogs", "cnn")
# corpus -> the folder names it may have under --input
FOLDERS = {"wikipedia": ("wikipedia_en_2015", "wikipedia"), "blogs": ("blog_authorship", "blogs"),
           "cnn": ("cnn_stories", "cnn")}
# corpus -> (hub dataset, config, text column)
HUB = {"wikipedia": ("wikimedia/wikipedia", "20231101.en", "text"),
       "blogs": ("tasksource/blog_authorship_corpus", None, "text"),
       "cnn": ("abisee/cnn_dailymail", "3.0.0", "article")}
# Titles (title_key) of Wikipedia articles that are also WikiText-2 test articles. Found by
# comparing every title of the local Wikipedia copy with WikiText-2's " = Title = " lines
# (tests/python/test_english.py derives the set again from the two corpora).
WIKITEXT2_TEST_TITLES = frozenset({"americanbeauty1999film"})

_DOC = re.compile(r'<doc ([^>]*)>\n(.*?)</doc>', re.S)
_TITLE = re.compile(r'title="([^"]*)"')
_POST = re.compile(r"<post>(.*?)</post>", re.S)
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")
_HIGHLIGHT = re.compile(r"^@highlight\s*$", re.M)


def title_key(title):
    """A title compared without case, spaces or punctuation ("American Beauty (1999 film)" ->
    "americanbeauty1999film")."""
    return re.sub(r"[^0-9a-z]", "", title.lower())


def decode_lenient(data):
    """UTF-8, else Windows-1252 (the blog corpus has both), never failing."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


# ------------------------------------------------------------------------ document parsers
# Each takes the bytes of one input file (decompressed) and yields (end, text): the document
# and how far into the bytes it ends, so that progress moves within a file.


def wikipedia_docs(data):
    """WikiExtractor's <doc id=... title=...>\\n...</doc> records; the text stripped."""
    text = data.decode("utf-8", errors="replace")
    n = max(len(text), 1)
    for m in _DOC.finditer(text):
        t = _TITLE.search(m.group(1))
        title = html.unescape(t.group(1)) if t else ""
        yield m.end() / n, title, m.group(2).strip()


def clean_post(body):
    """A blog post as plain text: entities decoded, each line's padding and runs of spaces
    removed, at most one blank line between paragraphs."""
    body = html.unescape(body.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_SPACES.sub(" ", line).strip() for line in body.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def blog_posts(data):
    """The posts of one blogger's .xml file, cleaned (clean_post), empty ones included."""
    text = decode_lenient(data)
    n = max(len(text), 1)
    for m in _POST.finditer(text):
        yield m.end() / n, clean_post(m.group(1))


def story_body(data):
    """A CNN .story file's text before its first @highlight line, stripped."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    m = _HIGHLIGHT.search(text)
    return (text[:m.start()] if m else text).strip()


# ------------------------------------------------------------------------ local corpora


def _is_archive(name):
    low = name.lower()
    return low.endswith((".tar", ".tar.xz", ".txz", ".tar.gz", ".tgz"))


class LocalCorpus:
    """The documents of one corpus in a local folder, in sorted path order (archives' members in
    their stored order), with bytes_done()/total_bytes for progress and mixing. Subclasses
    say which files and archive members count and how a member becomes documents."""

    name = None

    def __init__(self, folder):
        self.folder = folder
        files = []
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            files += [os.path.join(root, n) for n in sorted(names) if self.wants_file(n)]
        if not files:
            raise DataError(f"{folder}: no {self.name} files in it ({self.expect}); "
                            f"leave {self.name} out with --corpora, or fix the folder")
        self.files = files
        self.total_bytes = sum(os.path.getsize(p) for p in files)
        self._done = 0.0
        self.docs = 0       # documents yielded
        self.skipped = {}   # reason -> count

    def bytes_done(self):
        return self._done

    def skip(self, reason):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def __iter__(self):
        for path in self.files:
            size = os.path.getsize(path)
            base = self._done
            try:
                with open(path, "rb") as raw:
                    if _is_archive(path):
                        with tarfile.open(fileobj=raw, mode=tar_stream_mode(path)) as tf:
                            for m in tf:
                                if m.isfile() and self.wants_member(m.name):
                                    data = tf.extractfile(m).read()
                                    for _, doc in self.parse(f"{path}:{m.name}", data):
                                        self._done = base + float(min(raw.tell(), size))
                                        yield from self._emit(doc)
                    else:
                        data = open_decompressed(path, raw).read()
                        for frac, doc in self.parse(path, data):
                            self._done = base + frac * size
                            yield from self._emit(doc)
            except (OSError, EOFError, lzma.LZMAError, tarfile.TarError) as e:
                raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e
            self._done = base + size

    def _emit(self, doc):
        if doc:
            self.docs += 1
            yield doc
        else:
            self.skip("empty")

    def report(self):
        nf = len(self.files)
        s = f"{self.name}: {self.docs:,} documents from {nf} file{'s' if nf != 1 else ''} in {self.folder}"
        if self.skipped:
            s += " (left out: " + ", ".join(f"{n:,} {r}" for r, n in sorted(self.skipped.items())) + ")"
        return s


class WikipediaCorpus(LocalCorpus):
    name = "wikipedia"
    expect = "WikiExtractor files wiki_NN, wiki_NN.xz or wiki_NN.bz2"

    def wants_file(self, n):
        return re.match(r"wiki_\d+(\.xz|\.bz2)?$", n) is not None

    def parse(self, where, data):
        found = False
        for frac, title, text in wikipedia_docs(data):
            found = True
            if title_key(title) in WIKITEXT2_TEST_TITLES:
                self.skip("also in WikiText-2 test")
                continue
            yield frac, text
        if not found and data.strip():
            raise DataError(f"{where}: no <doc ...>...</doc> records; is it WikiExtractor output?")


class BlogCorpus(LocalCorpus):
    name = "blogs"
    expect = "<blogger>.xml files, or .tar(.xz|.gz) archives of them"

    def wants_file(self, n):
        return n.lower().endswith(".xml") or _is_archive(n)

    def wants_member(self, n):
        return n.lower().endswith(".xml")

    def parse(self, where, data):
        yield from blog_posts(data)


class CNNCorpus(LocalCorpus):
    name = "cnn"
    expect = ".story files, or .tar(.xz|.gz) archives of them"

    def __init__(self, folder):
        super().__init__(folder)
        self.seen = set()

    def wants_file(self, n):
        return n.lower().endswith(".story") or _is_archive(n)

    def wants_member(self, n):
        return n.lower().endswith(".story")

    def parse(self, where, data):
        body = story_body(data)
        h = hashlib.sha1(body.encode()).digest()
        if body and h in self.seen:
            self.skip("repeated stories")
            return
        self.seen.add(h)
        yield 1.0, body


LOCAL = {"wikipedia": WikipediaCorpus, "blogs": BlogCorpus, "cnn": CNNCorpus}


def local_corpus(root, name):
    for sub in FOLDERS[name]:
        p = os.path.join(root, sub)
        if os.path.isdir(p):
            return LOCAL[name](p)
    raise DataError(f"{root}: no folder for {name} (looked for {', '.join(FOLDERS[name])}/); "
                    f"choose the corpora present with --corpora")


class HubCorpus(HFSource):
    """One corpus streamed from the hub; its progress is the fraction of its documents read."""

    def __init__(self, name):
        dataset, config, column = HUB[name]
        super().__init__(dataset, config, streaming=True, column=column)
        self.name = name

    def report(self):
        return f"{self.name}: {self.n:,} documents from the hub ({HUB[self.name][0]})"


# ------------------------------------------------------------------------ mixing


def _progress(src):
    total = getattr(src, "total_bytes", None)
    if total:
        return src.bytes_done() / total
    total = getattr(src, "total_docs", None)
    return src.bytes_done() / total if total else None


class Mix:
    """Interleaves the documents of several sources: each next document comes from the source
    that has read the smallest fraction of its input (ties to the earlier source), so every
    corpus is spread evenly over the shards; when a fraction is unknown, one from each in turn."""

    def __init__(self, sources):
        self.sources = sources
        if all(hasattr(s, "total_bytes") for s in sources):
            self.total_bytes = sum(s.total_bytes for s in sources)
        else:  # the hub: progress in documents
            docs = [getattr(s, "total_docs", None) for s in sources]
            self.total_docs = sum(docs) if all(docs) else None

    def bytes_done(self):
        return sum(s.bytes_done() for s in self.sources)

    def __iter__(self):
        live = [(i, iter(s), s) for i, s in enumerate(self.sources)]
        turn = 0
        while live:
            fracs = [_progress(s) for _, _, s in live]
            if any(f is None for f in fracs):
                k = turn % len(live)
                turn += 1
            else:
                k = min(range(len(live)), key=lambda j: (fracs[j], live[j][0]))
            try:
                yield next(live[k][1])
            except StopIteration:
                del live[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="folder holding wikipedia_en_2015/, blog_authorship/, cnn_stories/ "
                                    "(default: stream from the Hugging Face hub)")
    ap.add_argument("--corpora", type=comma_list(CORPORA, "corpus"), default=list(CORPORA),
                    help=f"which corpora, comma-separated (default {','.join(CORPORA)})")
    add_shard_args(ap, os.path.join(HERE, "english"), shard_size=10_000_000, val_docs=2000)
    args = ap.parse_args()
    if args.input is not None:
        if not os.path.isdir(args.input):
            raise DataError(f"--input must be a folder holding the corpora's folders: {args.input}")
        sources = [local_corpus(args.input, c) for c in args.corpora]
    else:
        sources = [HubCorpus(c) for c in args.corpora]
    write_text_dataset(Mix(sources), "english", args.input or "the Hugging Face hub", args)
    for s in sources:
        print(s.report())


if __name__ == "__main__":
    sys.exit(run_main(main))
