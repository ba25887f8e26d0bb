"""data/english.py: Wikipedia, blog and CNN corpora -> one interleaved dataset of llm.c shards.

The synthetic corpora are made in the test in each source's layout (WikiExtractor files, blog XML
with CRLF and Windows-1252, CNN .story files with @highlight), and the documents expected are
written out by hand. The real corpora's counts come from shared/data/SOURCES.md and the
corpora's manifests, which were made independently of this code.
"""

import bz2
import csv
import glob
import lzma
import os
import tarfile

import pytest

from conftest import load_data_script, shared_file
from test_data import check_shard_header, make_tar_xz, ok, split_at_eot


@pytest.fixture(scope="module")
def english():
    return load_data_script("english")


WIKI_00 = ('<doc id="12" url="http://en.wikipedia.org/wiki?curid=12" title="Anarchism">\n'
           "Anarchism\n\nAnarchism is a political philosophy.\nHistory.\nIt is old.\n</doc>\n"
           '<doc id="44122" url="http://en.wikipedia.org/wiki?curid=44122" title="American Beauty (1999 film)">\n'
           "American Beauty (1999 film)\n\nA film.\n</doc>\n")
WIKI_01 = ('<doc id="90" url="http://en.wikipedia.org/wiki?curid=90" title="Tom &amp; Jerry">\n'
           "Tom &amp; Jerry\n\nA cartoon.\n\n</doc>\n")
BLOG_A = ("<Blog>\r\n\r\n<date>31,May,2004</date>\r\n<post>\r\n\r\n\t \r\n"
          "      Well, it rained.  It\u2019s fine&nbsp;now.\r\n     \r\n\r\n\r\n    Second  paragraph.\r\n</post>\r\n\r\n"
          "<date>30,May,2004</date>\r\n<post>\r\n   \r\n</post>\r\n</Blog>\r\n").encode("cp1252")
BLOG_B = "<Blog>\n<post>\n  Caf\u00e9 &amp; cake \u2014 yum.\n</post>\n</Blog>\n".encode("utf-8")
STORY_1 = b"Seoul (CNN) -- A story.\n\nIt goes on.\n\n@highlight\n\nA summary\n\n@highlight\n\nAnother\n"
STORY_2 = b"Atlanta (CNN) -- Another story, no highlights.\n"

EXPECTED = {
    "wikipedia": ["Anarchism\n\nAnarchism is a political philosophy.\nHistory.\nIt is old.", "Tom &amp; Jerry\n\nA cartoon."],
    "blogs": ["Well, it rained. It\u2019s fine now.\n\nSecond paragraph.", "Caf\u00e9 & cake \u2014 yum."],
    "cnn": ["Seoul (CNN) -- A story.\n\nIt goes on.", "Atlanta (CNN) -- Another story, no highlights."],
}


def make_corpora(root):
    """The three corpora in their shared/data layouts, under root."""
    os.makedirs(root / "wikipedia_en_2015" / "AA")
    (root / "wikipedia_en_2015" / "AA" / "wiki_00.xz").write_bytes(lzma.compress(WIKI_00.encode()))
    (root / "wikipedia_en_2015" / "AA" / "wiki_01.bz2").write_bytes(bz2.compress(WIKI_01.encode()))
    (root / "wikipedia_en_2015" / "MANIFEST.tsv").write_text("not a corpus file\n")
    os.makedirs(root / "blog_authorship")
    make_tar_xz(root / "blog_authorship" / "blogs_00.tar.xz",
                {"blogs/1.male.25.x.Leo.xml": BLOG_A, "blogs/README": b"<post>not a blog file</post>",
                 "blogs/2.female.17.y.Aries.xml": BLOG_B})
    os.makedirs(root / "cnn_stories")
    make_tar_xz(root / "cnn_stories" / "cnn_stories_b4.tar.xz",
                {"stories_b4/cnn_test0.story": STORY_1, "stories_b4/cnn_test1.story": STORY_1,
                 "stories_b4/cnn_test2.story": STORY_2})


def decoded(out, enc, name="english"):
    val = sorted(glob.glob(os.path.join(out, f"{name}_val_*.bin")))
    train = sorted(glob.glob(os.path.join(out, f"{name}_train_*.bin")))
    assert len(val) == 1
    docs = [[enc.decode(d.tolist()) for d in split_at_eot(check_shard_header(p))] for p in val + train]
    return docs[0], [d for part in docs[1:] for d in part]


def test_synthetic_corpora(run_script, enc, tmp_path):
    make_corpora(tmp_path / "in")
    out = tmp_path / "out"
    proc = ok(run_script("english.py", "--input", tmp_path / "in", "--out", out, "--val_docs", 2, "--shard_size", 30))
    val, train = decoded(out, enc)
    # Every corpus starts at 0% read: ties go to the earlier corpus, and reading one document
    # moves a corpus past 0, so the first three documents are one from each, in order.
    assert val == [EXPECTED["wikipedia"][0], EXPECTED["blogs"][0]]
    assert train[0] == EXPECTED["cnn"][0]
    assert sorted(val + train) == sorted(d for docs in EXPECTED.values() for d in docs)
    assert len(glob.glob(str(out / "english_train_*.bin"))) >= 2, "--shard_size 30 must give several train shards"
    assert "wikipedia: 2 documents from 2 files" in proc.stdout and "1 also in WikiText-2 test" in proc.stdout
    assert "blogs: 2 documents from 1 file in" in proc.stdout and "1 empty" in proc.stdout
    assert "cnn: 2 documents from 1 file in" in proc.stdout and "1 repeated stories" in proc.stdout
    assert os.path.exists(out / "gpt2_tokenizer.bin")


def test_corpora_subset_and_char_vocab(run_script, enc, tmp_path):
    make_corpora(tmp_path / "in")
    out = tmp_path / "out"
    proc = ok(run_script("english.py", "--input", tmp_path / "in", "--out", out, "--corpora", "cnn,wikipedia",
                         "--val_docs", 1, "--vocab", "char"))
    chars = "\n " + "".join(chr(c) for c in range(33, 127))
    # id 0 ("\n") is also the EOT that leads every document, so the documents are found by text
    files = sorted(glob.glob(str(out / "english_char_val_*.bin"))) + sorted(glob.glob(str(out / "english_char_train_*.bin")))
    assert [os.path.basename(p) for p in files[:2]] == ["english_char_val_000000.bin", "english_char_train_000001.bin"]
    text = "".join("".join(chars[i] for i in check_shard_header(p)) for p in files)
    for doc in EXPECTED["cnn"] + EXPECTED["wikipedia"]:
        assert "\n" + doc in text
    assert "blogs:" not in proc.stdout and "Caf" not in text
    assert not glob.glob(str(out / "english_val_*.bin")), "--vocab char must not write GPT-2 shards"


def test_mix_order(english):
    class Fake:
        def __init__(self, name, n):
            self.name, self.n, self.read, self.total_bytes = name, n, 0, 100

        def bytes_done(self):
            return self.read * 100 // self.n

        def __iter__(self):
            for i in range(self.n):
                self.read += 1
                yield f"{self.name}{i}"

    # A: 4 documents (25% each), B: 2 (50% each). Worked by hand: each next document comes from
    # the corpus read least, ties to A: A0 (0 = 0), B0 (25 > 0), A1 (25 < 50), A2 (50 = 50, A first),
    # B1 (75 > 50), A3.
    assert list(english.Mix([Fake("A", 4), Fake("B", 2)])) == ["A0", "B0", "A1", "A2", "B1", "A3"]

    class NoTotal(Fake):
        def __init__(self, name, n):
            super().__init__(name, n)
            del self.total_bytes
            self.total_docs = None

    # a fraction unknown (the hub without metadata): one from each in turn
    assert list(english.Mix([NoTotal("A", 3), NoTotal("B", 1)])) == ["A0", "B0", "A1", "A2"]


def test_clean_post_and_story(english):
    assert english.clean_post("\r\n\t \r\n   a  b&nbsp;\tc \r\n\r\n\r\n\r\n d \r\n") == "a b c\n\nd"
    assert english.clean_post(" &nbsp; \n\t") == ""
    assert english.story_body(b"Body.\r\n\r\n@highlight\r\n\r\nx") == "Body."
    assert english.story_body(b"A line with @highlight inside.\n") == "A line with @highlight inside."
    assert english.title_key("American Beauty (1999 film)") == "americanbeauty1999film"
    assert english.decode_lenient(b"it\x92s") == "it\u2019s"


def test_bad_inputs(run_script, tmp_path):
    make_corpora(tmp_path / "in")
    p = run_script("english.py", "--input", tmp_path / "in", "--corpora", "wikipedia,news", "--out", tmp_path / "o")
    assert p.returncode == 2 and "unknown corpus news: choose from wikipedia,blogs,cnn" in p.stderr
    p = run_script("english.py", "--input", tmp_path / "in", "--corpora", "cnn,cnn", "--out", tmp_path / "o")
    assert p.returncode == 2 and "a corpus is named twice: cnn,cnn" in p.stderr
    os.rename(tmp_path / "in" / "cnn_stories", tmp_path / "in" / "stories")
    p = run_script("english.py", "--input", tmp_path / "in", "--out", tmp_path / "o")
    assert p.returncode == 1 and "no folder for cnn (looked for cnn_stories, cnn/)" in p.stderr
    assert not os.path.exists(tmp_path / "o" / "english_val_000000.bin")
    os.makedirs(tmp_path / "in" / "cnn_stories")
    p = run_script("english.py", "--input", tmp_path / "in", "--out", tmp_path / "o")
    assert p.returncode == 1 and "cnn_stories: no cnn files in it" in p.stderr
    (tmp_path / "in" / "wikipedia_en_2015" / "AA" / "wiki_02").write_text("plain text, no doc records\n")
    p = run_script("english.py", "--input", tmp_path / "in", "--out", tmp_path / "o", "--corpora", "wikipedia")
    assert p.returncode == 1 and "wiki_02: no <doc ...>...</doc> records" in p.stderr
    p = run_script("english.py", "--input", tmp_path / "nothing", "--out", tmp_path / "o")
    assert p.returncode == 1 and "--input must be a folder" in p.stderr


# ---------------------------------------------------------------------------- the real corpora


def manifest(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_real_wikipedia(english, shared_data):
    """Article counts per file equal MANIFEST.tsv's, and the Wikipedia titles shared with
    WikiText-2 are exactly the ones the script leaves out."""
    folder = shared_file(shared_data, "wikipedia_en_2015")
    wikitext = load_data_script("wikitext")
    keys, total = set(), 0
    for row in manifest(os.path.join(folder, "MANIFEST.tsv")):
        docs = list(english.wikipedia_docs(lzma.open(os.path.join(folder, row["stored_file"])).read()))
        assert len(docs) == int(row["docs"]), row["stored_file"]
        keys |= {english.title_key(t) for _, t, _ in docs}
        total += len(docs)
    assert total == 7360  # SOURCES.md
    for split, overlap in (("test", english.WIKITEXT2_TEST_TITLES), ("valid", set())):
        lines = open(shared_file(shared_data, f"wikitext-2/{split}.txt"), encoding="utf-8").read().split("\n")[:-1]
        titles = {english.title_key(wikitext.title_of(a)) for a in wikitext.articles(lines)}
        assert titles & keys == overlap, split


def test_real_blogs(english, shared_data):
    """SOURCES.md: blogs_00 holds 483 files and 15,300 posts, 15,213 of them non-empty once stripped."""
    path = shared_file(shared_data, "blog_authorship/blogs_00.tar.xz")
    files = posts = nonempty = 0
    with tarfile.open(path, "r|xz") as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".xml"):
                files += 1
                for _, text in english.blog_posts(tf.extractfile(m).read()):
                    posts += 1
                    nonempty += bool(text)
    assert files == 483 and posts == 15300
    # clean_post also decodes entities, so a post of only "&nbsp;" is empty here (not in SOURCES' count)
    assert 15200 <= nonempty <= 15213


def test_real_cnn(english, shared_data, enc):
    """SOURCES.md: 7,054 stories, 15 pairs of identical files; 6,776,758 GPT-2 tokens in the
    bodies (text before the first @highlight, stripped), duplicates included."""
    path = shared_file(shared_data, "cnn_stories/cnn_stories_b4.tar.xz")
    corpus = english.CNNCorpus(os.path.dirname(path))
    bodies = list(corpus)
    assert len(bodies) == 7054 - 15 and corpus.skipped == {"repeated stories": 15}
    with tarfile.open(path, "r|xz") as tf:
        all_bodies = [english.story_body(tf.extractfile(m).read()) for m in tf if m.isfile()]
    assert len(all_bodies) == 7054
    assert sum(len(t) for t in enc.encode_ordinary_batch(all_bodies, num_threads=4)) == 6_776_758
