"""Tests of data/common.py, data/tinyshakespeare.py, data/openwebtext.py and data/hellaswag.py.

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


# ---------------------------------------------------------------------------------- eval files (HellaSwag)

EVAL_MAGIC = 20240522
DELIM = 65535

# two hand-built examples and, written out by hand, the uint16 stream llm.c's write_evalfile
# gives for them: delimiter, bytes, index, label, completions, then length-prefixed token lists
EVAL_EXAMPLES = [
    {"label": 1, "ctx_tokens": [10, 20, 30], "ending_tokens": [[1], [2, 3]]},
    {"label": 0, "ctx_tokens": [65534], "ending_tokens": [[0], [4], [5, 6, 7]]},
]
EVAL_STREAM = [
    DELIM, 28, 0, 1, 2, 3, 10, 20, 30, 1, 1, 2, 2, 3,          # 14 uint16 = 28 bytes
    DELIM, 30, 1, 0, 3, 1, 65534, 1, 0, 1, 4, 3, 5, 6, 7,      # 15 uint16 = 30 bytes
]


def eval_header(path):
    raw = open(path, "rb").read()
    return np.frombuffer(raw[:1024], dtype="<i4"), raw[1024:]


def test_evalfile_write_read(common, tmp_path):
    p = str(tmp_path / "e.bin")
    assert common.write_evalfile(p, EVAL_EXAMPLES) == (2, 30)
    assert not os.path.exists(p + ".tmp")
    header, body = eval_header(p)
    assert header[:4].tolist() == [EVAL_MAGIC, 1, 2, 30] and not header[4:].any()
    assert body == np.array(EVAL_STREAM, dtype="<u2").tobytes()
    assert body[:4] == b"\xff\xff\x1c\x00"  # little-endian on disk
    assert common.read_evalfile(p) == EVAL_EXAMPLES
    # numpy token arrays and integer types are written the same way
    as_np = [{"label": np.int64(x["label"]), "ctx_tokens": np.array(x["ctx_tokens"], dtype=np.int32),
              "ending_tokens": [np.array(e, dtype=np.uint16) for e in x["ending_tokens"]]} for x in EVAL_EXAMPLES]
    p2 = str(tmp_path / "e2.bin")
    common.write_evalfile(p2, as_np)
    assert open(p2, "rb").read() == open(p, "rb").read()


def test_evalfile_limits(common, tmp_path):
    p = str(tmp_path / "e.bin")
    common.write_evalfile(p, EVAL_EXAMPLES)
    before = open(p, "rb").read()

    def refused(examples, *needles):
        with pytest.raises(common.DataError) as ei:
            common.write_evalfile(p, examples)
        msg = str(ei.value)
        assert p in msg, msg
        for n in needles:
            assert n in msg, msg
        # checked before writing: the earlier file is untouched, no temporary is left
        assert open(p, "rb").read() == before and not os.path.exists(p + ".tmp")

    good = EVAL_EXAMPLES[0]

    def ex(**kw):
        return dict(good, **kw)

    refused([good, ex(ctx_tokens=[1, 65535])], "example 1", "65535")
    refused([ex(ending_tokens=[[1], [65536]])], "example 0", "completion 1")
    refused([ex(ctx_tokens=[-1])], "example 0", "context")
    refused([ex(ctx_tokens=[1.0])], "example 0", "context")
    refused([ex(label=2)], "label 2", "0..1")
    refused([ex(label=-1)], "label -1")
    refused([ex(label=True)], "label True")
    refused([ex(ending_tokens=[[1]])], "1 completion")
    refused([ex(ctx_tokens=[])], "empty context")
    refused([ex(ending_tokens=[[1], []])], "completion 1 has no tokens")
    refused([{"label": 0, "ctx_tokens": [1]}], "example 0", "ending_tokens")
    refused([], "no examples")
    # an example's size must fit its uint16 field: with two 1-token completions an example of n
    # context tokens takes 2 * (n + 10) bytes, so 32757 tokens fit (65534 bytes), 32758 do not
    refused([good, ex(ctx_tokens=[7] * 32758, ending_tokens=[[1], [2]])], "example 1", "65,536 bytes")
    big = ex(ctx_tokens=[7] * 32757, ending_tokens=[[1], [2]], label=0)
    assert common.write_evalfile(p, [big]) == (1, 65534)
    assert common.read_evalfile(p) == [big]
    before = open(p, "rb").read()
    # fewer than 65536 examples: the index is a uint16 too
    tiny = {"label": 0, "ctx_tokens": [1], "ending_tokens": [[2], [3]]}
    refused([tiny] * 65536, "65,536 examples")
    assert common.write_evalfile(p, [tiny] * 65535) == (65535, 22)
    back = common.read_evalfile(p)
    assert len(back) == 65535 and back[-1] == tiny


def test_read_evalfile_validates(common, tmp_path):
    p = str(tmp_path / "e.bin")
    common.write_evalfile(p, EVAL_EXAMPLES)
    raw = open(p, "rb").read()

    def bad(data, *needles):
        open(p, "wb").write(data)
        with pytest.raises(ValueError) as ei:
            common.read_evalfile(p)
        for n in needles:
            assert n in str(ei.value), str(ei.value)

    def patched(word, value, header_int=None):
        """raw with stream uint16 number `word` (or header int32 `header_int`) set to value."""
        b = bytearray(raw)
        if header_int is not None:
            b[4 * header_int:4 * header_int + 4] = np.array([value], dtype="<i4").tobytes()
        else:
            b[1024 + 2 * word:1024 + 2 * word + 2] = np.array([value], dtype="<u2").tobytes()
        return bytes(b)

    bad(raw[:100], "shorter")
    bad(patched(0, 20240520, header_int=0), "magic", "data shard")
    bad(patched(0, 2, header_int=1), "version")
    bad(patched(0, 3, header_int=2), "ends after 2 of the 3")
    bad(patched(0, 1, header_int=2), "bytes follow")
    bad(patched(0, 28, header_int=3), "longest")
    bad(patched(14, 0), "example 1", "delimiter")          # second example's delimiter
    bad(patched(15, 40), "example 1", "size of 40 bytes")  # runs past the file
    bad(patched(1, 30), "example 0", "states 30 bytes")    # size disagrees with its fields
    bad(patched(16, 0), "example 1", "index 0")
    bad(patched(3, 2), "example 0", "label 2")
    bad(patched(5, 9), "example 0", "context has 9 tokens")
    bad(patched(6, DELIM), "example 0", "delimiter")       # a context token of 65535
    bad(raw + b"\x00", "not a whole number")
    bad(raw[:-2], "example 1")
    open(p, "wb").write(raw)
    assert common.read_evalfile(p) == EVAL_EXAMPLES


# HellaSwag's own layout (hellaswag_val.jsonl): "ctx" is ctx_a + " " + ctx_b, label an int 0..3
HS_EXAMPLES = [
    {"ind": 24, "activity_label": "Roof shingle removal",
     "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady",
     "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
     "split": "val", "split_type": "zeroshot", "label": 2,
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                 "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
     "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 106, "activity_label": "Cooking",
     "ctx_a": "Un caf\u00e9 cr\u00e8me \u2014 \u65e5\u672c \"quoted\"", "ctx_b": "",
     "ctx": "Un caf\u00e9 cr\u00e8me \u2014 \u65e5\u672c \"quoted\" ", "split": "val", "split_type": "indomain",
     "label": 0, "endings": ["", "  two spaces", "<|endoftext|> as text", "tab\there\nnewline"],
     "source_id": "wikihow~1"},
    {"ind": 7, "activity_label": "Baking cookies",
     "ctx_a": "A female chef in white uniform shows a stack of baking pans in a large kitchen presenting them.",
     "ctx_b": "the pans", "ctx": "A female chef in white uniform shows a stack of baking pans in a large "
     "kitchen presenting them. the pans", "split": "val", "split_type": "indomain", "label": 1,
     "endings": ["contain egg yolks and baking soda.", "are then sprinkled with brown sugar.",
                 "are placed in a strainer on the counter.", "are filled with pastries and loaded into the oven."],
     "source_id": "activitynet~v_-2dxp-mv2zo"},
]


def write_jsonl(path, objs, blank_after=None):
    lines = [json.dumps(o) for o in objs]
    if blank_after is not None:
        lines.insert(blank_after + 1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def hs_expected(enc, objs):
    return [{"label": o["label"], "ctx_tokens": enc.encode(o["ctx"], disallowed_special=()),
             "ending_tokens": [enc.encode(" " + e, disallowed_special=()) for e in o["endings"]]} for o in objs]


def test_hellaswag_jsonl(common, run_script, enc, tmp_path):
    inp = write_jsonl(tmp_path / "hellaswag_val.jsonl", HS_EXAMPLES, blank_after=1)
    out = tmp_path / "out"
    proc = ok(run_script("hellaswag.py", "--input", inp, "--out", out))
    assert sorted(os.listdir(out)) == ["hellaswag_val.bin"]
    path = str(out / "hellaswag_val.bin")
    want = hs_expected(enc, HS_EXAMPLES)
    assert common.read_evalfile(path) == want
    # the header by hand: llm.c's magic and version, the count, the longest example in bytes
    header, body = eval_header(path)
    sizes = [2 * (6 + len(x["ctx_tokens"]) + sum(1 + len(e) for e in x["ending_tokens"])) for x in want]
    assert header[:4].tolist() == [EVAL_MAGIC, 1, 4, max(sizes)] and not header[4:].any()
    assert len(body) == sum(sizes)
    # the rendering: ctx as is, every ending after one space, "<|endoftext|>" as plain text
    assert enc.decode(want[0]["ending_tokens"][3]) == " starts pulling up roofing on a roof."
    assert want[2]["ending_tokens"][0] == enc.encode(" ") and EOT not in want[2]["ending_tokens"][2]
    assert f"wrote {path}: 4 examples, longest example {max(sizes):,} bytes" in proc.stdout
    # --max_examples keeps the first N; --split names the output
    proc = ok(run_script("hellaswag.py", "--input", inp, "--out", out, "--max_examples", 2, "--split", "train"))
    assert common.read_evalfile(str(out / "hellaswag_train.bin")) == want[:2]
    # labels given as strings ("2", as in some copies of HellaSwag) are read as integers
    obj = dict(HS_EXAMPLES[1], label="2")
    inp2 = write_jsonl(tmp_path / "str_label.jsonl", [obj])
    ok(run_script("hellaswag.py", "--input", inp2, "--out", tmp_path / "out2"))
    assert common.read_evalfile(str(tmp_path / "out2" / "hellaswag_val.bin")) == hs_expected(enc, [HS_EXAMPLES[1]])


def hs_fails(run_script, tmp_path, *args, env_extra=None):
    out = tmp_path / "out_bad"
    proc = run_script("hellaswag.py", *args, "--out", out, env_extra=env_extra, timeout=60)
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not glob.glob(os.path.join(out, "*.bin")), "no eval file is written for a bad input"
    return proc.stderr


def test_hellaswag_bad_input(run_script, tmp_path):
    good = [json.dumps(o) for o in HS_EXAMPLES]
    bad = tmp_path / "bad.jsonl"

    def with_line3(text):
        bad.write_text("\n".join(good[:2] + [text] + good[2:]) + "\n", encoding="utf-8")
        return bad

    err = hs_fails(run_script, tmp_path, "--input", with_line3('{"ctx": "broken", "endings": ['))
    assert f"{bad}:3" in err and "invalid JSON" in err
    err = hs_fails(run_script, tmp_path, "--input", with_line3(json.dumps(dict(HS_EXAMPLES[0], endings=["a", "b", "c"]))))
    assert f"{bad}:3" in err and "3 endings" in err and "4 strings" in err
    err = hs_fails(run_script, tmp_path, "--input", with_line3(json.dumps(dict(HS_EXAMPLES[0], label=4))))
    assert f"{bad}:3" in err and '"label" is 4' in err
    err = hs_fails(run_script, tmp_path, "--input", with_line3(json.dumps(dict(HS_EXAMPLES[0], label="x"))))
    assert f"{bad}:3" in err and '"label"' in err
    no_label = {k: v for k, v in HS_EXAMPLES[0].items() if k != "label"}
    err = hs_fails(run_script, tmp_path, "--input", with_line3(json.dumps(no_label)))
    assert f"{bad}:3" in err and "'label'" in err and "no labels" in err
    err = hs_fails(run_script, tmp_path, "--input", with_line3(json.dumps({"endings": ["a"] * 4, "label": 0})))
    assert f"{bad}:3" in err and "'ctx'" in err
    err = hs_fails(run_script, tmp_path, "--input", with_line3(json.dumps(dict(HS_EXAMPLES[0], endings=["a", "b", 3, "d"]))))
    assert f"{bad}:3" in err and "ending 2" in err
    err = hs_fails(run_script, tmp_path, "--input", with_line3("[1, 2]"))
    assert f"{bad}:3" in err and "JSON object" in err
    # an example too long for its uint16 size field once tokenized (33,000 context tokens)
    err = hs_fails(run_script, tmp_path, "--input", with_line3(json.dumps(dict(HS_EXAMPLES[0], ctx=" word" * 33000))))
    assert f"{bad}:3" in err and "65,534" in err
    # the test split has no labels: refused before anything is read
    err = hs_fails(run_script, tmp_path, "--input", write_jsonl(tmp_path / "ok.jsonl", HS_EXAMPLES), "--split", "test")
    assert "test split has no labels" in err
    missing = str(tmp_path / "no_such.jsonl")
    assert missing in hs_fails(run_script, tmp_path, "--input", missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert "no examples" in hs_fails(run_script, tmp_path, "--input", empty)


OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def test_hellaswag_download(common, run_script, enc, tmp_path):
    # offline (an unreachable proxy): the download fails with the URL and the --input hint
    err = hs_fails(run_script, tmp_path, "--split", "train", env_extra=OFFLINE)
    assert "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl" in err
    assert "--input" in err
    bad_out = tmp_path / "out_bad"
    assert not bad_out.exists() or not os.listdir(bad_out)  # no partial download left behind
    # a finished download already in --out is used as is
    out = tmp_path / "out"
    out.mkdir()
    write_jsonl(out / "hellaswag_val.jsonl", HS_EXAMPLES[:3])
    proc = ok(run_script("hellaswag.py", "--out", out, env_extra=OFFLINE))
    assert "already exists, not downloading" in proc.stdout
    assert common.read_evalfile(str(out / "hellaswag_val.bin")) == hs_expected(enc, HS_EXAMPLES[:3])
