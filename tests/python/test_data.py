"""Tests of data/common.py, data/tinyshakespeare.py and data/openwebtext.py.

The scripts run as subprocesses on real shared data, offline (TIKTOKEN_CACHE_DIR)."""

import glob
import io
import json
import lzma
import os
import tarfile

import numpy as np
import pytest

from conftest import shared_file

EOT = 50256
SHARD_SIZE = 50_000


# ---------------------------------------------------------------------------------- helpers


def check_shard_header(path):
    """Checks the llm.c header by hand (independently of read_shard); returns the tokens."""
    raw = open(path, "rb").read()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520, f"{path}: magic"
    assert header[1] == 1, f"{path}: version"
    assert len(raw) == 1024 + 2 * int(header[2]), f"{path}: token count does not match the file size"
    assert not header[3:].any(), f"{path}: header padding not zero"
    return np.frombuffer(raw[1024:], dtype="<u2")


def split_at_eot(tokens):
    """The documents of a token stream in which every document starts with EOT."""
    tokens = np.asarray(tokens)
    assert tokens.size == 0 or tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT)
    ends = list(starts[1:]) + [tokens.size]
    return [tokens[s + 1:e] for s, e in zip(starts, ends)]


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def owt_shards(out):
    val = sorted(glob.glob(os.path.join(out, "openwebtext_val_*.bin")))
    train = sorted(glob.glob(os.path.join(out, "openwebtext_train_*.bin")))
    return val, train


def read_owt_output(out, shard_size=None):
    """Checks shard naming, headers, sizes and leading EOTs; returns the concatenated tokens."""
    val, train = owt_shards(out)
    assert [os.path.basename(p) for p in val] == ["openwebtext_val_000000.bin"]
    assert [os.path.basename(p) for p in train] == [f"openwebtext_train_{i:06d}.bin" for i in range(1, len(train) + 1)]
    parts = []
    for p in val + train:
        t = check_shard_header(p)
        assert t.size > 0 and t[0] == EOT, f"{p} does not start with EOT"
        if shard_size is not None:
            assert t.size <= shard_size, f"{p}: {t.size} tokens > shard size {shard_size}"
        parts.append(t)
    return np.concatenate(parts), len(train)


def make_tar_xz(path, members):
    """Writes an xz-compressed tar with the given {name: bytes} members (in order)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with open(path, "wb") as f:
        f.write(lzma.compress(buf.getvalue()))


def owt_docs(shared_data, n):
    path = shared_file(shared_data, "openwebtext_10k_nanogpt_val/owt10k_val_union.jsonl.xz")
    docs = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            if len(docs) == n:
                break
    return path, docs


# ---------------------------------------------------------------------------------- common.py units


def test_shard_write_read(common, tmp_path):
    p = str(tmp_path / "s.bin")
    toks = [EOT, 0, 1, 65535, 300]
    common.write_shard(p, toks)
    assert not os.path.exists(p + ".tmp")
    assert check_shard_header(p).tolist() == toks
    r = common.read_shard(p)
    assert r.dtype == np.uint16 and r.tolist() == toks
    common.write_shard(p, np.array([], dtype=np.uint16))
    assert common.read_shard(p).size == 0


def test_shard_rejects_large_tokens(common, tmp_path):
    p = str(tmp_path / "big.bin")
    with pytest.raises(AssertionError, match="65535"):
        common.write_shard(p, [1, 2, 65536])
    with pytest.raises(AssertionError):
        common.write_shard(p, [-1])
    assert not os.path.exists(p) and not os.path.exists(p + ".tmp")


def test_read_shard_validates(common, tmp_path):
    p = str(tmp_path / "s.bin")
    common.write_shard(p, [1, 2, 3])
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:-2])
    with pytest.raises(ValueError, match="header says 3 tokens"):
        common.read_shard(p)
    bad = bytearray(raw)
    bad[0] ^= 1
    open(p, "wb").write(bytes(bad))
    with pytest.raises(ValueError, match="magic"):
        common.read_shard(p)
    bad = bytearray(raw)
    bad[4] = 7
    open(p, "wb").write(bytes(bad))
    with pytest.raises(ValueError, match="version"):
        common.read_shard(p)
    open(p, "wb").write(raw[:100])
    with pytest.raises(ValueError, match="shorter"):
        common.read_shard(p)


def test_tokenizer_bin_write_read(common, tmp_path):
    p = str(tmp_path / "tok.bin")
    entries = [b"a", b"bc", bytes(range(255)), b"<|endoftext|>"]
    common.write_tokenizer_bin(p, entries, 3)
    raw = open(p, "rb").read()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:4].tolist() == [20240328, 2, 4, 3]
    assert raw[1024:1027] == b"\x01a\x02"
    assert common.read_tokenizer_bin(p) == (entries, 3)
    with pytest.raises(AssertionError, match="1..255"):
        common.write_tokenizer_bin(p, [b"a", b""], 0)
    with pytest.raises(AssertionError, match="1..255"):
        common.write_tokenizer_bin(p, [b"a", b"x" * 256], 0)


def test_shard_writer_packing(common, tmp_path):
    out = str(tmp_path)
    w = common.ShardWriter(out, "t", EOT, shard_size=10)
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9] * 25, [10, 11]]
    for d in docs:
        w.add_document(d)
    written = w.close()
    names = [os.path.basename(p) for p, _ in written]
    assert names[0] == "t_val_000000.bin" and names[1] == "t_train_000001.bin"
    shards = [common.read_shard(p) for p, _ in written]
    assert all(s.size <= 10 and s[0] == EOT for s in shards)
    # doc 1 does not fit after doc 0 (4 + 6 = 10 fits exactly), the long doc is cut
    assert shards[0].tolist() == [EOT, 1, 2, 3, EOT, 4, 5, 6, 7, 8]
    allt = np.concatenate(shards)
    assert np.concatenate(split_at_eot(allt)).tolist() == sum(docs, [])
    # stale shards from a longer earlier run are removed
    w = common.ShardWriter(out, "t", EOT, shard_size=100)
    w.add_document([1])
    assert len(w.close()) == 1
    assert sorted(os.listdir(out)) == ["t_val_000000.bin"]


def test_shard_writer_val_docs(common, tmp_path):
    w = common.ShardWriter(str(tmp_path), "t", EOT, shard_size=5, val_docs=2)
    for d in ([1, 2, 3], [4, 5, 6], [7], [8]):
        w.add_document(d)
    shards = [common.read_shard(p).tolist() for p, _ in w.close()]
    assert shards == [[EOT, 1, 2, 3, EOT, 4, 5, 6], [EOT, 7, EOT, 8]]


def test_paragraph_split(common):
    lines = io.StringIO("a\nb\n\n\n  \nc\n\nd").readlines()
    assert list(common.split_paragraph_lines(lines)) == ["a\nb", "c", "d"]


# ---------------------------------------------------------------------------------- tinyshakespeare


@pytest.fixture(scope="session")
def tiny_text(shared_data):
    path = shared_file(shared_data, "tinyshakespeare/input.txt")
    with open(path, "r", encoding="utf-8", newline="") as f:
        return path, f.read()


@pytest.fixture(scope="session")
def tiny_out(tiny_text, run_script, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tinyshakespeare"))
    proc = ok(run_script("tinyshakespeare.py", "--input", tiny_text[0], "--out", out))
    return out, proc


def tiny_docs(text):
    """The documented splitting: sections on "\\n\\n", each but the last keeps "\\n\\n"."""
    secs = text.split("\n\n")
    return [s + "\n\n" for s in secs[:-1]] + [secs[-1]]


def test_tinyshakespeare_shards(tiny_out, tiny_text, enc):
    out, proc = tiny_out
    text = tiny_text[1]
    val = check_shard_header(os.path.join(out, "tiny_shakespeare_val.bin"))
    train = check_shard_header(os.path.join(out, "tiny_shakespeare_train.bin"))
    assert val.size == 32768
    assert val[0] == EOT and train[0] == EOT
    docs = tiny_docs(text)
    assert "".join(docs) == text
    # llm.c's stream: EOT + encoding of each section; val is its first 32768 tokens, train the
    # rest, with one extra EOT in front when the cut fell inside a section
    ref = []
    for d in docs:
        ref.append(EOT)
        ref.extend(enc.encode_ordinary(d))
    extra = 0 if ref[32768] == EOT else 1
    assert val.tolist() == ref[:32768]
    assert train.tolist() == [EOT] * extra + ref[32768:]
    allt = np.concatenate([val, train])
    n_eot = int((allt == EOT).sum())
    assert n_eot == len(docs) + extra
    expected = [t for d in docs for t in enc.encode_ordinary(d)]
    assert allt.size == len(expected) + n_eot
    assert allt[allt != EOT].tolist() == expected
    # decode round trip
    assert enc.decode(allt[allt != EOT].tolist()) == text
    assert "train: 305,261 tokens, val: 32,768 tokens" in proc.stdout


def test_tinyshakespeare_llmc_compat(tiny_text, run_script, tmp_path):
    ok(run_script("tinyshakespeare.py", "--input", tiny_text[0], "--out", tmp_path, "--no_train_eot"))
    train = check_shard_header(str(tmp_path / "tiny_shakespeare_train.bin"))
    val = check_shard_header(str(tmp_path / "tiny_shakespeare_val.bin"))
    assert (train.size, val.size) == (305260, 32768)  # llm.c's tinyshakespeare.py counts


def test_tokenizer_bin(tiny_out, enc):
    out, _ = tiny_out
    p = os.path.join(out, "gpt2_tokenizer.bin")
    raw = open(p, "rb").read()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:4].tolist() == [20240328, 2, 50257, 50256]
    entries, pos = [], 1024
    while pos < len(raw):
        n = raw[pos]
        assert n >= 1
        entries.append(raw[pos + 1:pos + 1 + n])
        pos += 1 + n
    assert pos == len(raw) and len(entries) == 50257
    assert entries[50256] == b"<|endoftext|>"
    the = enc.encode_ordinary(" the")
    assert len(the) == 1 and entries[the[0]] == b" the"
    assert all(entries[i] == enc.decode_single_token_bytes(i) for i in range(0, 50257, 97))
    # decoding a shard through the .bin entries equals tiktoken's decode
    val = check_shard_header(os.path.join(out, "tiny_shakespeare_val.bin"))
    assert b"".join(entries[t] for t in val.tolist()) == enc.decode_bytes(val.tolist())


# ---------------------------------------------------------------------------------- openwebtext


def test_openwebtext_jsonl(shared_data, run_script, enc, tmp_path):
    path, docs = owt_docs(shared_data, 200)
    out = str(tmp_path / "owt")
    proc = ok(run_script("openwebtext.py", "--input", path, "--out", out, "--max_docs", 200,
                         "--shard_size", SHARD_SIZE))
    allt, ntrain = read_owt_output(out, SHARD_SIZE)
    assert ntrain >= 2, proc.stdout
    got = split_at_eot(allt)
    assert len(got) == 200  # no document is longer than a shard here
    for i, (g, d) in enumerate(zip(got, docs)):
        assert g.tolist() == enc.encode_ordinary(d), f"document {i}"
        assert enc.decode(g.tolist()) == d
    assert os.path.exists(os.path.join(out, "gpt2_tokenizer.bin"))
    # val shard is packed up to shard_size: adding the next document would overflow it
    val, _ = owt_shards(out)
    nval = check_shard_header(val[0]).size
    nval_docs = int((check_shard_header(val[0]) == EOT).sum())
    assert nval + 1 + len(got[nval_docs]) > SHARD_SIZE


def test_openwebtext_val_docs(shared_data, run_script, tmp_path):
    path, _ = owt_docs(shared_data, 1)
    out = str(tmp_path)
    ok(run_script("openwebtext.py", "--input", path, "--out", out, "--max_docs", 30, "--val_docs", 10,
                  "--shard_size", 20000))
    val, train = owt_shards(out)
    assert int((check_shard_header(val[0]) == EOT).sum()) == 10
    assert sum(int((check_shard_header(p) == EOT).sum()) for p in train) == 20


SYNTH_DOCS = {
    "0000001-aaaa.txt": "First document.\nIt has two lines.\n",
    "0000002-bbbb.txt": "Second document, with unicode: caf\u00e9 \u2014 \u65e5\u672c.\n\n\n\nAfter a run of blank lines.",
    "0000003-cccc.txt": "  Third <|endoftext|> document  \n",
}


def synth_expected(docs):
    # the Hugging Face loader's cleaning: 3+ newlines -> 2, strip
    import re
    return [re.sub("\n\n\n+", "\n\n", t).strip() for t in docs.values()]


def make_subset(path, docs):
    make_tar_xz(path, {name: text.encode("utf-8") for name, text in docs.items()})


def decoded_docs(out, enc):
    allt, _ = read_owt_output(out)
    return [enc.decode(d.tolist()) for d in split_at_eot(allt)]


def test_openwebtext_subset_xz(run_script, enc, tmp_path):
    sub = str(tmp_path / "urlsf_subset00-1_data.xz")
    make_subset(sub, SYNTH_DOCS)
    expected = synth_expected(SYNTH_DOCS)
    # shards just big enough for the longest document: several shards, no document cut
    size = max(len(enc.encode_ordinary(t)) for t in expected) + 1
    out = str(tmp_path / "out")
    ok(run_script("openwebtext.py", "--input", sub, "--out", out, "--shard_size", size))
    assert decoded_docs(out, enc) == expected
    # "<|endoftext|>" inside a document is text, not the EOT token
    allt, ntrain = read_owt_output(out, size)
    assert int((allt == EOT).sum()) == 3 and ntrain >= 1
    # with a shard size below the longest document, that document is cut into EOT-led pieces
    out = str(tmp_path / "out_small")
    ok(run_script("openwebtext.py", "--input", sub, "--out", out, "--shard_size", 8))
    allt, _ = read_owt_output(out, 8)
    assert enc.decode(allt[allt != EOT].tolist()) == "".join(expected)


def test_openwebtext_outer_tar_and_folder(run_script, enc, tmp_path):
    docs2 = {"0000004-dddd.txt": "Fourth.", "0000005-eeee.txt": "Fifth!"}
    folder = tmp_path / "subsets"
    folder.mkdir()
    make_subset(str(folder / "urlsf_subset00-1_data.xz"), SYNTH_DOCS)
    make_subset(str(folder / "urlsf_subset00-2_data.xz"), docs2)
    expected = synth_expected(SYNTH_DOCS) + synth_expected(docs2)
    # a folder of *_data.xz files
    out = str(tmp_path / "out1")
    ok(run_script("openwebtext.py", "--input", folder, "--out", out))
    assert decoded_docs(out, enc) == expected
    # the outer openwebtext.tar.xz holding openwebtext/urlsf_subset*_data.xz
    outer = str(tmp_path / "openwebtext.tar.xz")
    make_tar_xz(outer, {f"openwebtext/{n}": open(folder / n, "rb").read() for n in sorted(os.listdir(folder))})
    out = str(tmp_path / "out2")
    ok(run_script("openwebtext.py", "--input", outer, "--out", out, "--max_docs", 4))
    assert decoded_docs(out, enc) == expected[:4]


def test_openwebtext_txt_folder_and_paragraphs(run_script, enc, tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    texts = ["doc one\n\nstill doc one\n", "doc two"]
    for i, t in enumerate(texts):
        (folder / f"{i}.txt").write_text(t, encoding="utf-8")
    (folder / "ignored.md").write_text("not a document")
    out = str(tmp_path / "out1")
    ok(run_script("openwebtext.py", "--input", folder, "--out", out))
    assert decoded_docs(out, enc) == texts  # .txt files in a folder are kept unchanged
    plain = tmp_path / "plain.txt"
    plain.write_text("para one\nline two\n\n\npara two\n\npara three\n", encoding="utf-8")
    out = str(tmp_path / "out2")
    ok(run_script("openwebtext.py", "--input", plain, "--out", out, "--split_paragraphs"))
    assert decoded_docs(out, enc) == ["para one\nline two", "para two", "para three"]
    out = str(tmp_path / "out3")
    ok(run_script("openwebtext.py", "--input", plain, "--out", out))
    assert decoded_docs(out, enc) == [plain.read_text()]


# ---------------------------------------------------------------------------------- bad inputs


def test_missing_input(run_script, tmp_path):
    missing = str(tmp_path / "no_such_file.jsonl")
    for script in ("openwebtext.py", "tinyshakespeare.py"):
        proc = run_script(script, "--input", missing, "--out", tmp_path / "out")
        assert proc.returncode != 0
        assert missing in proc.stderr and "Traceback" not in proc.stderr


def test_jsonl_without_text(run_script, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"body": "no text here"}\n', encoding="utf-8")
    proc = run_script("openwebtext.py", "--input", bad, "--out", tmp_path / "out")
    assert proc.returncode != 0
    assert f"{bad}:3" in proc.stderr and '"text"' in proc.stderr and "Traceback" not in proc.stderr
    bad.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    proc = run_script("openwebtext.py", "--input", bad, "--out", tmp_path / "out")
    assert proc.returncode != 0 and f"{bad}:2" in proc.stderr


def test_no_tiktoken_cache(run_script, tiny_text, tmp_path):
    empty = tmp_path / "cache"
    empty.mkdir()
    # an empty cache and an unreachable proxy: tiktoken cannot get its files
    proc = run_script("tinyshakespeare.py", "--input", tiny_text[0], "--out", tmp_path / "out",
                      env_extra={"TIKTOKEN_CACHE_DIR": str(empty), "HTTPS_PROXY": "http://127.0.0.1:9",
                                 "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""},
                      timeout=60)
    assert proc.returncode == 1
    assert "TIKTOKEN_CACHE_DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_hf_download_needs_datasets(run_script, tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip("the datasets package is installed; not downloading OpenWebText in a test")
    except ImportError:
        pass
    proc = run_script("openwebtext.py", "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert "pip install datasets" in proc.stderr and "--input" in proc.stderr


# ---------------------------------------------------------------------------------- --vocab char

# the 96-symbol character vocabulary, spelled out independently of data/common.py
CHARS = "\n " + "".join(chr(c) for c in range(33, 127))
CHAR_ID = {c: i for i, c in enumerate(CHARS)}
CHAR_EOT = 0


def char_encodable(text):
    return all(c in CHAR_ID for c in text)


def char_decode(tokens):
    return "".join(CHARS[int(t)] for t in tokens)


def read_tokenizer_entries(path):
    raw = open(path, "rb").read()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    entries, pos = [], 1024
    while pos < len(raw):
        n = raw[pos]
        entries.append(raw[pos + 1:pos + 1 + n])
        pos += 1 + n
    assert pos == len(raw)
    return header, entries


def test_char_tokenizer_unit(common):
    tok = common.get_tokenizer("char")
    assert (tok.vocab_size, tok.eot, tok.name) == (96, 0, "char")
    text = "Hello, world!\n  ~{|}`"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and ids.tolist() == [CHAR_ID[c] for c in text]
    assert tok.encode("\n !~").tolist() == [0, 1, 2, 95]
    assert tok.decode(ids) == text
    assert tok.encode("").tolist() == []
    for bad in ("tab\there", "cr\r\n", "caf\u00e9", "\u2019", "\x00", "\x7f", "a\x0bb"):
        assert tok.encode(bad) is None, repr(bad)
    assert tok.token_bytes() == [c.encode() for c in CHARS]
    assert tok.foreign_chars("ab\tc\u2014") == {"\t", "\u2014"}


@pytest.fixture(scope="session")
def tiny_char_out(tiny_text, run_script, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tinyshakespeare_char"))
    proc = ok(run_script("tinyshakespeare.py", "--input", tiny_text[0], "--out", out, "--vocab", "char"))
    return out, proc


def test_tinyshakespeare_char(tiny_char_out, tiny_text):
    out, proc = tiny_char_out
    text = tiny_text[1]
    # char outputs are named apart from the GPT-2 ones
    assert sorted(os.listdir(out)) == ["char_tokenizer.bin", "tiny_shakespeare_char_train.bin",
                                       "tiny_shakespeare_char_val.bin"]
    val = check_shard_header(os.path.join(out, "tiny_shakespeare_char_val.bin"))
    train = check_shard_header(os.path.join(out, "tiny_shakespeare_char_train.bin"))
    assert val.size == 32768
    assert val[0] == CHAR_EOT and train[0] == CHAR_EOT
    assert int(val.max()) < 96 and int(train.max()) < 96
    docs = tiny_docs(text)
    assert all(char_encodable(d) for d in docs)  # Tiny Shakespeare is plain ASCII: nothing dropped
    assert f"{len(docs):,} documents (sections) kept, 0 dropped" in proc.stdout
    # the stream is EOT + one id per character for every section; val = its first 32768 ids,
    # train the rest, with an extra EOT in front when the cut fell on a non-EOT token
    starts, pos = [], 0
    for d in docs:
        starts.append(pos)
        pos += 1 + len(d)
    ref_len = pos
    stream = np.concatenate([val, train])
    extra = stream.size - ref_len
    assert extra in (0, 1)
    if extra:
        assert train[0] == CHAR_EOT
        stream = np.concatenate([val, train[1:]])
    # every document starts with EOT; dropping those leading EOTs decodes to the input text
    assert (stream[starts] == CHAR_EOT).all()
    keep = np.ones(stream.size, dtype=bool)
    keep[starts] = False
    assert char_decode(stream[keep]) == text
    # and the whole stream is the text with "\n" before every section
    assert char_decode(stream) == "".join("\n" + d for d in docs)
    assert f"train: {train.size:,} tokens, val: 32,768 tokens" in proc.stdout


def test_char_tokenizer_bin(tiny_char_out):
    out, _ = tiny_char_out
    header, entries = read_tokenizer_entries(os.path.join(out, "char_tokenizer.bin"))
    assert header[:4].tolist() == [20240328, 2, 96, 0]
    assert not header[4:].any()
    assert len(entries) == 96
    assert entries[0] == b"\n" and entries[1] == b" " and entries[2] == b"!" and entries[95] == b"~"
    assert entries == [bytes([c]) for c in [10, 32] + list(range(33, 127))]
    # decoding the val shard through the file's entries equals the reference decode
    val = check_shard_header(os.path.join(out, "tiny_shakespeare_char_val.bin"))
    assert b"".join(entries[t] for t in val.tolist()).decode("ascii") == char_decode(val)


def test_tinyshakespeare_char_drops(run_script, tmp_path):
    secs = ["First section.\nplain", "has a\ttab", "caf\u00e9 here", "third kept ~!", "last"]
    text = "\n\n".join(secs)
    inp = tmp_path / "input.txt"
    inp.write_text(text, encoding="utf-8", newline="")
    out = tmp_path / "out"
    proc = ok(run_script("tinyshakespeare.py", "--input", inp, "--out", out, "--vocab", "char",
                         "--val_tokens", 10))
    docs = tiny_docs(text)
    kept = [d for d in docs if char_encodable(d)]
    assert len(kept) == 3
    assert "3 documents (sections) kept, 2 dropped" in proc.stdout
    val = check_shard_header(str(out / "tiny_shakespeare_char_val.bin"))
    train = check_shard_header(str(out / "tiny_shakespeare_char_train.bin"))
    stream = "".join("\n" + d for d in kept)
    assert char_decode(val) == stream[:10]
    assert char_decode(train) == ("" if stream[10] == "\n" else "\n") + stream[10:]


def owt_char_shards(out):
    val = sorted(glob.glob(os.path.join(out, "openwebtext_char_val_*.bin")))
    train = sorted(glob.glob(os.path.join(out, "openwebtext_char_train_*.bin")))
    assert [os.path.basename(p) for p in val] == ["openwebtext_char_val_000000.bin"]
    assert [os.path.basename(p) for p in train] == \
        [f"openwebtext_char_train_{i:06d}.bin" for i in range(1, len(train) + 1)]
    return val + train


def test_openwebtext_char(shared_data, run_script, tmp_path):
    path, docs = owt_docs(shared_data, 100)
    out = tmp_path / "owt"
    out.mkdir()
    # GPT-2 shards already in the folder are neither overwritten nor removed as stale
    for n in ("openwebtext_val_000000.bin", "openwebtext_train_000007.bin"):
        (out / n).write_bytes(b"gpt2")
    shard_size = 30_000
    proc = ok(run_script("openwebtext.py", "--input", path, "--out", out, "--max_docs", 100,
                         "--shard_size", shard_size, "--vocab", "char"))
    assert (out / "openwebtext_val_000000.bin").read_bytes() == b"gpt2"
    assert (out / "openwebtext_train_000007.bin").read_bytes() == b"gpt2"
    assert not (out / "gpt2_tokenizer.bin").exists()
    header, entries = read_tokenizer_entries(str(out / "char_tokenizer.bin"))
    assert header[:4].tolist() == [20240328, 2, 96, 0] and len(entries) == 96
    # recompute which documents must be dropped: those with a character outside the 96
    docs = [d for d in docs if d]
    kept = [d for d in docs if char_encodable(d)]
    dropped = [d for d in docs if not char_encodable(d)]
    assert len(docs) == 100 and kept and dropped
    assert f"{len(kept)} documents kept, {len(dropped)} dropped" in proc.stdout
    assert max(len(d) for d in kept) + 1 <= shard_size  # so no kept document is cut
    # walk the shards: each is EOT-led whole kept documents, in input order, none missing
    shards = owt_char_shards(str(out))
    assert len(shards) >= 2, proc.stdout
    i = 0
    for p in shards:
        t = check_shard_header(p)
        assert 0 < t.size <= shard_size and t[0] == CHAR_EOT and int(t.max()) < 96
        s, pos = char_decode(t), 0
        while pos < len(s):
            assert i < len(kept), f"{p}: more text than the kept documents"
            piece = "\n" + kept[i]
            assert s[pos:pos + len(piece)] == piece, f"{p}: kept document {i} does not round-trip"
            pos += len(piece)
            i += 1
    assert i == len(kept)


def test_openwebtext_char_all_dropped(run_script, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "curly \u2019quote\u2019"}) + "\n" + json.dumps({"text": "tab\there"}) + "\n",
                   encoding="utf-8")
    proc = run_script("openwebtext.py", "--input", bad, "--out", tmp_path / "out", "--vocab", "char")
    assert proc.returncode == 1
    assert "all 2 documents" in proc.stderr and "Traceback" not in proc.stderr


def test_char_help(run_script):
    for script in ("openwebtext.py", "tinyshakespeare.py"):
        h = ok(run_script(script, "--help")).stdout
        assert "char_tokenizer.bin" in h and "vocab_size = 96" in h and "-tk" in h, script
