"""Shared code for the structgpt data preparation scripts.

File formats (compatible with karpathy/llm.c):

* Data shard (``*.bin``): a header of 256 little-endian int32
  ``[0]=20240520`` (magic), ``[1]=1`` (version), ``[2]=number of tokens``, the
  rest zero; then the tokens as little-endian uint16.
* Tokenizer (``gpt2_tokenizer.bin``, ``char_tokenizer.bin``): a header of 256 little-endian int32
  ``[0]=20240328`` (magic), ``[1]=2`` (version), ``[2]=number of entries``,
  ``[3]=EOT token id``; then for every token id in order one uint8 length
  (1..255) followed by that many raw bytes.
* Multiple-choice eval file (``hellaswag_val.bin``, llm.c's ``write_evalfile``): a header of
  256 little-endian int32 ``[0]=20240522`` (magic), ``[1]=1`` (version), ``[2]=number of
  examples``, ``[3]=size in bytes of the longest example``, the rest zero; then the examples
  back to back, each a stream of little-endian uint16: ``65535`` (start of an example), the
  example's size in bytes (this whole stream, delimiter and this field included), its index in
  the file (0, 1, ...), the label (index of the correct completion), the number of completions
  K, the number of context tokens and the context tokens, then K times a completion's number
  of tokens and its tokens. The size and index fields being uint16, an example is under 65536
  bytes and a file holds fewer than 65536 examples; tokens are below 65535, the delimiter.

Documents: every document is preceded by the EOT token, so each document in a
shard starts with EOT (llm.c's convention).

The tokenizer is a small object (``encode``, ``encode_batch``, ``decode``,
``eot``, ``vocab_size``, ``token_bytes``); ``get_tokenizer(name)`` builds one.
"gpt2" is the GPT-2 BPE; "char" is a 96-symbol character vocabulary whose encode()
returns None for documents it cannot represent (the scripts drop those).
"""

import io
import json
import lzma
import os
import re
import sys
import tarfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
TOKENIZER_MAGIC = 20240328
TOKENIZER_VERSION = 2
EVAL_MAGIC = 20240522
EVAL_VERSION = 1
EVAL_DELIMITER = 2**16 - 1  # starts every example of an eval file, so no token may equal it
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DEFAULT_SHARD_SIZE = 100_000_000


class DataError(Exception):
    """A problem with the user's input; the scripts print it and exit 1."""


# --------------------------------------------------------------------------------------
# file formats


def _atomic_write(path, chunks):
    """Writes the byte chunks to path+'.tmp', fsyncs it, then renames it onto path."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable; not possible on every platform
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_shard(path, tokens):
    """Writes tokens (a sequence of ints or a numpy array) as an llm.c data shard."""
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {toks.shape}")
    if toks.size and toks.dtype != np.uint16:
        assert np.issubdtype(toks.dtype, np.integer), \
            f"write_shard({path}): tokens must be integers, got dtype {toks.dtype}"
        lo, hi = int(toks.min()), int(toks.max())
        assert 0 <= lo and hi < 2**16, (
            f"write_shard({path}): token ids must lie in [0, 65535] to fit uint16, "
            f"got min {lo} max {hi}; this vocabulary is too large for the llm.c shard format")
    toks = toks.astype("<u2", copy=False)
    assert toks.size < 2**31, f"write_shard({path}): {toks.size} tokens do not fit the int32 header"
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = toks.size
    _atomic_write(path, [header.tobytes(), toks.tobytes()])


def _check_header(path, head, size, magic, version, kind, not_this=""):
    """The 256-int32 header that every file here starts with, checked: the file (size bytes) holds
    one, then magic and version. not_this follows the bad-magic message; a shard given in place of
    another file is named as such."""
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte {kind} header")
    header = np.frombuffer(head[:HEADER_BYTES], dtype="<i4")
    if header[0] != magic:
        shard = " (an llm.c data shard)" if header[0] == SHARD_MAGIC and magic != SHARD_MAGIC else ""
        raise ValueError(f"{path}: bad magic {header[0]}, expected {magic}{not_this}{shard}")
    if header[1] != version:
        raise ValueError(f"{path}: unsupported {kind} version {header[1]}, expected {version}")
    return header


def read_shard(path):
    """Reads an llm.c data shard and returns its tokens (uint16), validating the header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = _check_header(path, f.read(HEADER_BYTES), size, SHARD_MAGIC, SHARD_VERSION, "shard",
                               " (not an llm.c data shard)")
        n = int(header[2])
        expected = HEADER_BYTES + 2 * n
        if n < 0 or size != expected:
            raise ValueError(f"{path}: header says {n} tokens ({expected} bytes) but the file has {size} bytes")
        toks = np.frombuffer(f.read(), dtype="<u2")
    return toks.astype(np.uint16)


def write_tokenizer_bin(path, token_bytes_list, eot_token):
    """Writes llm.c's tokenizer file (version 2): the raw bytes of every token id."""
    n = len(token_bytes_list)
    assert 0 <= eot_token < n, f"write_tokenizer_bin({path}): eot token {eot_token} outside vocab of {n}"
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = TOKENIZER_MAGIC
    header[1] = TOKENIZER_VERSION
    header[2] = n
    header[3] = eot_token
    body = bytearray()
    for i, b in enumerate(token_bytes_list):
        b = bytes(b)
        assert 1 <= len(b) <= 255, \
            f"write_tokenizer_bin({path}): token {i} has {len(b)} bytes; the format allows 1..255"
        body.append(len(b))
        body += b
    _atomic_write(path, [header.tobytes(), bytes(body)])


def read_tokenizer_bin(path):
    """Reads a tokenizer file written by write_tokenizer_bin; returns (token_bytes_list, eot)."""
    with open(path, "rb") as f:
        data = f.read()
    header = _check_header(path, data, len(data), TOKENIZER_MAGIC, TOKENIZER_VERSION, "tokenizer")
    n, eot = int(header[2]), int(header[3])
    out, pos = [], HEADER_BYTES
    for i in range(n):
        if pos >= len(data):
            raise ValueError(f"{path}: truncated at entry {i} of {n}")
        ln = data[pos]
        out.append(data[pos + 1:pos + 1 + ln])
        pos += 1 + ln
    if pos != len(data):
        raise ValueError(f"{path}: {len(data) - pos} trailing bytes after {n} entries")
    return out, eot


def _eval_tokens(path, i, what, toks):
    """The token list of one segment of example i, checked: integers in [0, 65535)."""
    if isinstance(toks, (str, bytes)) or not hasattr(toks, "__iter__"):
        raise DataError(f"{path}: example {i}: {what} must be a list of token ids, got {type(toks).__name__}")
    out = []
    for t in toks:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < EVAL_DELIMITER:
            raise DataError(f"{path}: example {i}: {what} holds token {t!r}; tokens must be integers in "
                            f"[0, {EVAL_DELIMITER - 1}] ({EVAL_DELIMITER} marks the start of an example)")
        out.append(int(t))
    return out


def write_evalfile(path, examples):
    """Writes multiple-choice examples (HellaSwag) as llm.c's eval file (format at the top).

    examples: a sequence of dicts {"label": int, "ctx_tokens": [int], "ending_tokens": [[int]]};
    example i is written with index i. Every example is checked before anything is written, so
    a bad one leaves no file behind (DataError naming the file and the example): the format's
    limits (tokens below 65535, an example under 65536 bytes, fewer than 65536 examples, a label
    below the number of completions), and what the trainers' eval needs beyond them: at least
    one example, at least 2 completions, and a context and completions of at least one token
    each (a completion is scored by the loss of its tokens, each predicted from the token
    before it). Returns (number of examples, size in bytes of the longest example)."""
    examples = list(examples)
    if not examples:
        raise DataError(f"{path}: no examples to write; an eval file needs at least one")
    if len(examples) >= 2**16:
        raise DataError(f"{path}: {len(examples):,} examples; the eval file's uint16 index allows at most "
                        f"{2**16 - 1:,} (use fewer examples)")
    stream = []
    longest = 0
    for i, ex in enumerate(examples):
        try:
            label, ctx, endings = ex["label"], ex["ctx_tokens"], ex["ending_tokens"]
        except (KeyError, TypeError) as e:
            raise DataError(f'{path}: example {i} must be a dict with "label", "ctx_tokens" and '
                            f'"ending_tokens" (missing {e})') from e
        ctx = _eval_tokens(path, i, "the context", ctx)
        if isinstance(endings, (str, bytes)) or not hasattr(endings, "__iter__"):
            raise DataError(f"{path}: example {i}: ending_tokens must be a list of token lists, "
                            f"got {type(endings).__name__}")
        endings = [_eval_tokens(path, i, f"completion {c}", e) for c, e in enumerate(endings)]
        if len(endings) < 2:
            raise DataError(f"{path}: example {i} has {len(endings)} completion(s); a multiple-choice "
                            f"example needs at least 2")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < len(endings):
            raise DataError(f"{path}: example {i} has label {label!r}; it must be the index of one of its "
                            f"{len(endings)} completions (0..{len(endings) - 1})")
        if not ctx:
            raise DataError(f"{path}: example {i} has an empty context; the eval needs at least one "
                            f"context token to predict the first completion token from")
        for c, e in enumerate(endings):
            if not e:
                raise DataError(f"{path}: example {i}: completion {c} has no tokens; it could not be scored")
        words = 5 + 1 + len(ctx) + sum(1 + len(e) for e in endings)
        nbytes = 2 * words
        if nbytes >= 2**16:
            raise DataError(f"{path}: example {i} takes {nbytes:,} bytes ({len(ctx):,} context tokens, "
                            f"completions of {', '.join(str(len(e)) for e in endings)} tokens); the eval "
                            f"file's uint16 size field allows at most {2**16 - 2:,}")
        longest = max(longest, nbytes)
        stream += [EVAL_DELIMITER, nbytes, i, int(label), len(endings), len(ctx)]
        stream += ctx
        for e in endings:
            stream.append(len(e))
            stream += e
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = EVAL_MAGIC
    header[1] = EVAL_VERSION
    header[2] = len(examples)
    header[3] = longest
    _atomic_write(path, [header.tobytes(), np.array(stream, dtype="<u2").tobytes()])
    return len(examples), longest


def read_evalfile(path):
    """Reads an eval file written by write_evalfile (or llm.c) and returns its examples as dicts
    {"label", "ctx_tokens", "ending_tokens"}, the input of write_evalfile. Everything the format
    fixes is checked, a fault raising ValueError that names the file and the example: magic,
    version, every delimiter, size and index field, labels below the number of completions,
    tokens below 65535, the header's example count and longest size, and no trailing bytes."""
    with open(path, "rb") as f:
        data = f.read()
    header = _check_header(path, data, len(data), EVAL_MAGIC, EVAL_VERSION, "eval file", ": not an eval file")
    n, longest = int(header[2]), int(header[3])
    if n < 0:
        raise ValueError(f"{path}: header says {n} examples")
    body = data[HEADER_BYTES:]
    if len(body) % 2:
        raise ValueError(f"{path}: {len(body)} bytes after the header, not a whole number of uint16")
    s = np.frombuffer(body, dtype="<u2").tolist()
    examples, at, seen_longest = [], 0, 0
    for i in range(n):
        where = f"{path}: example {i} (at byte {HEADER_BYTES + 2 * at})"
        if at >= len(s):
            raise ValueError(f"{where}: the file ends after {i} of the {n} examples the header states")
        if s[at] != EVAL_DELIMITER:
            raise ValueError(f"{where}: starts with {s[at]}, not the delimiter {EVAL_DELIMITER}")
        if at + 6 > len(s):
            raise ValueError(f"{where}: the file ends inside the example's fields")
        nbytes, index, label, k = s[at + 1:at + 5]
        end = at + nbytes // 2
        if nbytes % 2 or nbytes < 12 or end > len(s):
            raise ValueError(f"{where}: states a size of {nbytes} bytes, which does not fit the file")
        if index != i:
            raise ValueError(f"{where}: carries index {index}; examples must be numbered 0, 1, ... in order")
        if label >= k:
            raise ValueError(f"{where}: label {label} but only {k} completions")
        pos, segs = at + 5, []
        for j in range(k + 1):
            what = "the context" if j == 0 else f"completion {j - 1}"
            if pos >= end:
                raise ValueError(f"{where}: ends before {what}")
            m = s[pos]
            pos += 1
            if pos + m > end:
                raise ValueError(f"{where}: {what} has {m} tokens, running past the example's {nbytes} bytes")
            seg = s[pos:pos + m]
            if EVAL_DELIMITER in seg:
                raise ValueError(f"{where}: {what} holds the delimiter {EVAL_DELIMITER} as a token")
            segs.append(seg)
            pos += m
        if pos != end:
            raise ValueError(f"{where}: states {nbytes} bytes but its fields take {2 * (pos - at)}")
        examples.append({"label": label, "ctx_tokens": segs[0], "ending_tokens": segs[1:]})
        seen_longest = max(seen_longest, nbytes)
        at = end
    if at != len(s):
        raise ValueError(f"{path}: {2 * (len(s) - at)} bytes follow the {n} examples the header states")
    if longest != seen_longest:
        raise ValueError(f"{path}: header says the longest example takes {longest} bytes, "
                         f"but the longest takes {seen_longest}")
    return examples


# --------------------------------------------------------------------------------------
# downloads


def download(url, path, hint=""):
    """Downloads url to path unless path already exists. The bytes go through _atomic_write, so
    an interrupted download never leaves a partial file under the final name (an existing path
    is a finished download). A failure is a DataError ending in hint (e.g. how to pass a local
    copy instead, for machines that are offline)."""
    if os.path.exists(path):
        print(f"{path} already exists, not downloading")
        return path
    print(f"downloading {url} -> {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            _atomic_write(path, iter(lambda: r.read(1 << 20), b""))
    except Exception as e:  # URLError, HTTPError, timeouts, a connection cut mid-transfer, ...
        msg = f"could not download {url} ({type(e).__name__}: {e})"
        raise DataError(msg + (f".\n{hint}" if hint else "")) from e
    return path


# --------------------------------------------------------------------------------------
# tokenizers

TIKTOKEN_HELP = (
    "could not load the GPT-2 BPE encoding with tiktoken ({err}).\n"
    "tiktoken downloads its files on first use; offline, set TIKTOKEN_CACHE_DIR to a folder that "
    "holds the GPT-2 BPE cache, e.g.\n"
    "  export TIKTOKEN_CACHE_DIR=/work/shared/data/tiktoken_cache")


class GPT2Tokenizer:
    """The GPT-2 BPE (tiktoken "gpt2"). Text is encoded with encode_ordinary: special-token
    strings such as "<|endoftext|>" inside documents are plain text, never the EOT id."""

    name = "gpt2"

    def __init__(self):
        try:
            import tiktoken
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cache, hash mismatch, ...
            raise DataError(TIKTOKEN_HELP.format(err=f"{type(e).__name__}: {e}")) from e
        self.eot = self._enc.eot_token          # 50256
        self.vocab_size = self._enc.n_vocab     # 50257

    def encode(self, text):
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts, executor=None):
        """Encodes a list of texts; tiktoken releases the GIL, so threads run in parallel."""
        if executor is None:
            return [self._enc.encode_ordinary(t) for t in texts]
        return list(executor.map(self._enc.encode_ordinary, texts))

    def decode(self, tokens):
        return self._enc.decode([int(t) for t in tokens])

    def token_bytes(self):
        return [self._enc.decode_single_token_bytes(i) for i in range(self.vocab_size)]


# The 96-symbol character vocabulary of the BTT-MoE paper's "small vocab" experiments:
# id 0 = "\n", id 1 = " ", ids 2..95 = the printable ASCII characters 33 ("!") .. 126 ("~").
CHAR_VOCAB = "\n " + "".join(chr(c) for c in range(33, 127))
assert len(CHAR_VOCAB) == 96
_CHAR_LUT = np.full(128, -1, dtype=np.int16)
for _i, _c in enumerate(CHAR_VOCAB):
    _CHAR_LUT[ord(_c)] = _i
_CHAR_SET = frozenset(CHAR_VOCAB)


class CharTokenizer:
    """One token per character over CHAR_VOCAB (96 ids). "\n" (id 0) doubles as the EOT token,
    so a document boundary in a shard reads as one extra newline.

    encode() returns None for a text holding any character outside the vocabulary (a tab, a
    carriage return, any non-ASCII character, ...): such documents are dropped whole by the
    scripts, never altered."""

    name = "char"
    eot = 0
    vocab_size = len(CHAR_VOCAB)

    def encode(self, text):
        if not text.isascii():
            return None
        ids = _CHAR_LUT[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
        if ids.size and ids.min() < 0:
            return None
        return ids.astype(np.uint16)

    def encode_batch(self, texts, executor=None):
        return [self.encode(t) for t in texts]

    def decode(self, tokens):
        return "".join(CHAR_VOCAB[int(t)] for t in tokens)

    def token_bytes(self):
        return [c.encode("ascii") for c in CHAR_VOCAB]

    @staticmethod
    def foreign_chars(text):
        """The characters of text that are outside the vocabulary."""
        return set(text) - _CHAR_SET


TOKENIZERS = {"gpt2": GPT2Tokenizer, "char": CharTokenizer}
# tokenizer files are named after the vocabulary: gpt2_tokenizer.bin, char_tokenizer.bin
VOCAB_HELP = ('vocabulary: "gpt2" (GPT-2 BPE, 50257 tokens) or "char" (96 characters: "\\n" = id 0, '
              'also the EOT; " " = id 1; ASCII 33..126 = ids 2..95; documents with any other '
              'character are dropped; a model for it needs vocab_size = 96 in its config, padded to '
              '128 by the trainer; the tokenizer is written as char_tokenizer.bin, pass it to the '
              'trainer with -tk)')


def get_tokenizer(name="gpt2"):
    if name not in TOKENIZERS:
        raise DataError(f"unknown vocabulary {name!r}; available: {', '.join(sorted(TOKENIZERS))}")
    return TOKENIZERS[name]()


def write_tokenizer_for(tok, out_dir):
    path = os.path.join(out_dir, f"{tok.name}_tokenizer.bin")
    write_tokenizer_bin(path, tok.token_bytes(), tok.eot)
    print(f"wrote {path} ({tok.vocab_size} tokens, eot {tok.eot})")
    return path


class DropStats:
    """Counts the documents a vocabulary cannot represent (encode() returned None) and the
    characters that caused it, for the scripts' report."""

    def __init__(self):
        self.kept = 0
        self.dropped = 0
        self.chars = {}

    def add_dropped(self, text, tok):
        self.dropped += 1
        for c in tok.foreign_chars(text):
            self.chars[c] = self.chars.get(c, 0) + 1

    def report(self, what="documents"):
        total = self.kept + self.dropped
        line = (f"{self.kept:,} {what} kept, {self.dropped:,} dropped (a character outside the "
                f"vocabulary) of {total:,}")
        if self.chars:
            top = sorted(self.chars.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
            line += "; most common causes (documents): " + ", ".join(f"{c!r} {n:,}" for c, n in top)
        return line


# --------------------------------------------------------------------------------------
# progress


class Progress:
    """A tiny tqdm replacement printing e.g. 'tokenizing: 45% 12.3 MB/27.1 MB 1.2 MB/s' to
    stderr. Silent for inputs that finish within the first second."""

    def __init__(self, total, label="tokenizing", unit="bytes", stream=None):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.time()
        self.last = 0.0
        self.shown = False
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval = 0.25 if self.tty else 10.0  # logs get one line per 10 s

    def _fmt(self, x):
        return f"{x / 1e6:.1f} MB" if self.unit == "bytes" else f"{x:,} {self.unit}"

    def update(self, done, extra="", force=False):
        now = time.time()
        if not force and (now - self.t0 < 1.0 or now - self.last < self.interval):
            return
        self.last = now
        self.shown = True
        el = max(now - self.t0, 1e-9)
        rate = f"{done / el / 1e6:.1f} MB/s" if self.unit == "bytes" else f"{done / el:,.0f} {self.unit}/s"
        if self.total:
            pct = f"{min(100.0, 100.0 * done / self.total):3.0f}% "
            amount = f"{self._fmt(done)}/{self._fmt(self.total)}"
        else:
            pct, amount = "", self._fmt(done)
        line = f"{self.label}: {pct}{amount} {rate}"
        if extra:
            line += " " + extra
        self.stream.write("\r" + line + "   " if self.tty else line + "\n")
        self.stream.flush()

    def close(self, done, extra=""):
        if self.shown:
            self.update(done, extra, force=True)
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------
# input readers

_PARA_BLANK = re.compile(r"^[ \t\r\f\v]*\n?$")


def owt_clean(text):
    """The cleaning the Hugging Face openwebtext loader applies to each original .txt document:
    collapse runs of 3+ newlines to 2 and strip surrounding whitespace."""
    return re.sub("\n\n\n+", "\n\n", text).strip()


def split_paragraph_lines(lines):
    """Yields documents from an iterable of text lines, split on runs of blank lines
    (lines holding only whitespace). Each document is its lines joined, without the final
    newline; blank lines themselves are dropped."""
    buf = []
    for line in lines:
        if _PARA_BLANK.match(line):
            if buf:
                yield "".join(buf).rstrip("\r\n")
                buf = []
        else:
            buf.append(line)
    if buf:
        yield "".join(buf).rstrip("\r\n")


def _kind_of(path):
    p = path.lower()
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith(".jsonl") or p.endswith(".jsonl.xz") or p.endswith(".jsonl.gz"):
        return "jsonl"
    if p.endswith(".xz") or p.endswith(".tar") or p.endswith(".tgz") or p.endswith(".tar.gz"):
        return "archive"
    return "text"


def open_decompressed(path, raw):
    """The binary stream of raw, decompressed as path's suffix says (.xz, .gz, .bz2; else as is)."""
    low = path.lower()
    if low.endswith(".xz"):
        return lzma.open(raw, "rb")
    if low.endswith(".gz"):
        import gzip
        return gzip.open(raw, "rb")
    if low.endswith(".bz2"):
        import bz2
        return bz2.open(raw, "rb")
    return raw


def tar_stream_mode(path):
    """tarfile's streaming mode for an archive named path (.tar.xz/.txz, .tar.gz/.tgz, .tar)."""
    low = path.lower()
    return "r|xz" if low.endswith((".xz", ".txz")) else ("r|gz" if low.endswith("gz") else "r|")


class DocSource:
    """Iterates the documents of --input, which may be
      * a plain text file: one document, or with split_paragraphs one per blank-line-separated
        paragraph;
      * a .jsonl / .jsonl.xz / .jsonl.gz file: one document per line, its "text" field;
      * a .parquet file (as FineWeb's are on the hub): one document per row of its "text"
        column (needs pyarrow);
      * an xz archive: an OpenWebText `urlsf_subsetNN-M_data.xz` (xz-compressed tar of .txt
        documents), the outer `openwebtext.tar.xz` (a tar of such files), any tar(.xz) of .txt
        files, or an xz-compressed plain text file (treated like a plain text file);
        documents from archives get owt_clean() as the Hugging Face loader does;
      * a folder: searched recursively in sorted order; each .txt file is one document
        (unchanged), and .jsonl*, .parquet, .xz, .tar files in it are read as above.
    Everything is streamed; bytes_done() reports the input bytes read so far (compressed
    bytes for compressed files) for the progress bar."""

    def __init__(self, path, split_paragraphs=False):
        self.path = path
        self.split_paragraphs = split_paragraphs
        if not os.path.exists(path):
            raise DataError(f"input not found: {path}")
        if os.path.isdir(path):
            files = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for n in sorted(names):
                    fp = os.path.join(root, n)
                    k = _kind_of(fp)
                    if k == "text":
                        k = "txtdoc" if n.lower().endswith(".txt") else None
                    if k is not None:
                        files.append((fp, k))
            if not files:
                raise DataError(f"input folder has no .txt, .jsonl(.xz), .parquet or .xz files: {path}")
        else:
            files = [(path, _kind_of(path))]
        self.files = files
        self.total_bytes = sum(os.path.getsize(fp) for fp, _ in files)
        self._done = 0
        self._cur = None

    def bytes_done(self):
        cur = 0
        if self._cur is not None and not self._cur.closed:
            try:
                cur = self._cur.tell()
            except (OSError, ValueError):
                cur = 0
        return self._done + cur

    def __iter__(self):
        for fp, kind in self.files:
            try:
                with open(fp, "rb") as raw:
                    self._cur = raw
                    if kind == "txtdoc":
                        yield raw.read().decode("utf-8", errors="replace")
                    elif kind == "text":
                        yield from self._text(fp, raw)
                    elif kind == "jsonl":
                        yield from self._jsonl(fp, raw)
                    elif kind == "parquet":
                        yield from self._parquet(fp, raw)
                    else:
                        yield from self._archive(fp, raw)
            except (OSError, EOFError, lzma.LZMAError, tarfile.TarError) as e:
                raise DataError(f"cannot read {fp}: {type(e).__name__}: {e}") from e
            finally:
                self._cur = None
            self._done += os.path.getsize(fp)

    def _text_docs(self, fp, binary):
        f = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        try:
            if self.split_paragraphs:
                yield from split_paragraph_lines(f)
            else:
                yield f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{fp}: not valid UTF-8 text ({e})") from e

    def _text(self, fp, raw):
        yield from self._text_docs(fp, raw)

    def _jsonl(self, fp, raw):
        f = io.TextIOWrapper(open_decompressed(fp, raw), encoding="utf-8")
        lineno = 0
        try:
            for line in f:
                lineno += 1
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{fp}:{lineno}: invalid JSON: {e}") from e
                if not isinstance(obj, dict) or "text" not in obj:
                    raise DataError(f'{fp}:{lineno}: JSON line has no "text" field')
                if not isinstance(obj["text"], str):
                    raise DataError(f'{fp}:{lineno}: "text" field is not a string')
                yield obj["text"]
        except UnicodeDecodeError as e:
            raise DataError(f"{fp}: line {lineno + 1} is not valid UTF-8 ({e})") from e

    def _parquet(self, fp, raw):
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{fp}: reading Parquet needs pyarrow: pip install pyarrow "
                            "(or give the documents as .jsonl)") from e
        try:
            pf = pq.ParquetFile(raw)
            names = pf.schema_arrow.names
            if "text" not in names:
                raise DataError(f'{fp}: no "text" column (its columns: {", ".join(names[:12])}); '
                                "the documents must be in a string column named text")
            row = 0
            for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
                for text in batch.column(0).to_pylist():
                    if text is not None and not isinstance(text, str):
                        raise DataError(f'{fp}: row {row}: "text" is {type(text).__name__}, not a string')
                    row += 1
                    yield text or ""
        except pyarrow.ArrowException as e:
            raise DataError(f"{fp}: not a readable Parquet file ({type(e).__name__}: {e})") from e

    def _archive(self, fp, raw):
        mode = tar_stream_mode(fp)
        try:
            tf = tarfile.open(fileobj=raw, mode=mode)
        except tarfile.ReadError:
            if mode != "r|xz":
                raise
            # not a tar: an xz-compressed plain text file
            raw.seek(0)
            with lzma.open(raw, "rb") as xf:
                yield from self._text_docs(fp, xf)
            return
        yield from self._tar_docs(fp, tf)

    def _tar_docs(self, fp, tf):
        """Documents of an open streaming tar; nested *.xz members (the per-subset archives of
        openwebtext.tar.xz) are opened as xz-compressed tars in turn."""
        with tf:
            for m in tf:
                if not m.isfile():
                    continue
                name = m.name.lower()
                if name.endswith(".txt"):
                    data = tf.extractfile(m).read()
                    yield owt_clean(data.decode("utf-8", errors="replace"))
                elif name.endswith(".xz"):
                    inner = tf.extractfile(m)
                    try:
                        itf = tarfile.open(fileobj=inner, mode="r|xz")
                    except tarfile.ReadError as e:
                        raise DataError(f"{fp}: member {m.name} is not an xz-compressed tar ({e})") from e
                    yield from self._tar_docs(f"{fp}:{m.name}", itf)


def iter_limited(it, max_docs):
    if max_docs is None:
        yield from it
        return
    for i, d in enumerate(it):
        if i >= max_docs:
            return
        yield d


def tokenize_stream(tok, docs, workers=1, batch_docs=256, progress_cb=None, with_text=False):
    """Yields the token list of every document in docs, in order, encoding batches of documents
    on `workers` threads (tiktoken releases the GIL while encoding). The token list is None for
    a document the vocabulary cannot represent (the char vocabulary). With with_text, yields
    (text, tokens) pairs instead."""
    ex = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def encoded(batch):
        toks = tok.encode_batch(batch, ex)
        return zip(batch, toks) if with_text else toks

    try:
        batch = []
        for d in docs:
            batch.append(d)
            if len(batch) >= batch_docs:
                yield from encoded(batch)
                batch = []
                if progress_cb:
                    progress_cb()
        if batch:
            yield from encoded(batch)
    finally:
        if ex is not None:
            ex.shutdown()


def kept_documents(tok, docs, drops, workers=1, progress_cb=None):
    """The token lists of docs, in order (tokenize_stream), of the documents the vocabulary can
    represent; the others (the char vocabulary drops a document with a foreign character) are
    counted in drops, and so are the kept ones."""
    for text, toks in tokenize_stream(tok, docs, workers=workers, progress_cb=progress_cb, with_text=True):
        if toks is None:
            drops.add_dropped(text, tok)
        else:
            drops.kept += 1
            yield toks


def dataset_name(name, vocab):
    """The output files' prefix: the dataset's name, and the vocabulary's unless it is GPT-2's."""
    return name if vocab == "gpt2" else f"{name}_{vocab}"


def write_splits(out_dir, prefix, splits, tok):
    """Writes every (split, tokens) of splits as <out_dir>/<prefix>_<split>.bin, one file each (as
    llm.c's tinyshakespeare and tinystories files), then the tokenizer; returns [(path, ntokens)]."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for split, toks in splits:
        p = os.path.join(out_dir, f"{prefix}_{split}.bin")
        write_shard(p, toks)
        written.append((p, toks.size))
    summarize(written)
    write_tokenizer_for(tok, out_dir)
    return written


# --------------------------------------------------------------------------------------
# shard writer


class ShardWriter:
    """Packs documents into shards `<out>/<name>_val_000000.bin`, `<out>/<name>_train_000001.bin`, ...

    Every document is preceded by the EOT token. The first shard is the validation shard and
    the rest are train shards (llm.c's convention). Documents are never split across shards
    unless a single document is longer than a shard: a shard is written as soon as the next
    document would not fit, so each shard holds at most shard_size tokens (a little less in
    general) and always starts with EOT. A document longer than shard_size is cut into
    pieces of shard_size tokens, each piece after the first getting its own leading EOT.

    With val_docs=N the validation shard instead holds exactly the first N documents,
    whatever their size (shard_size does not bound it); train shards follow as above.
    """

    def __init__(self, out_dir, name, eot, shard_size=DEFAULT_SHARD_SIZE, val_docs=None, vocab_size=None):
        if shard_size < 2:
            raise DataError(f"--shard_size must be at least 2 tokens, got {shard_size}")
        if vocab_size is not None:
            assert vocab_size <= 2**16, f"vocab of {vocab_size} tokens does not fit uint16 shards"
        self.out_dir, self.name, self.eot = out_dir, name, eot
        self.shard_size, self.val_docs = shard_size, val_docs
        self.buf, self.count = [], 0
        self.shard_index = 0
        self.ndocs = 0
        self.written = []   # (path, ntokens)
        self.total_tokens = 0
        os.makedirs(out_dir, exist_ok=True)

    def shard_path(self, index):
        split = "val" if index == 0 else "train"
        return os.path.join(self.out_dir, f"{self.name}_{split}_{index:06d}.bin")

    def _flush(self):
        if self.count == 0:
            return
        toks = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        path = self.shard_path(self.shard_index)
        write_shard(path, toks)
        self.written.append((path, int(toks.size)))
        self.total_tokens += int(toks.size)
        self.shard_index += 1
        self.buf, self.count = [], 0

    def add_document(self, tokens):
        """Adds one document (token ids without EOT)."""
        piece = np.empty(len(tokens) + 1, dtype=np.uint16)
        piece[0] = self.eot
        piece[1:] = tokens
        in_val = self.val_docs is not None and self.shard_index == 0
        if in_val:
            if self.ndocs == self.val_docs:
                self._flush()
                in_val = False
            else:
                self.buf.append(piece)
                self.count += piece.size
                self.ndocs += 1
                return
        self.ndocs += 1
        while self.count + piece.size > self.shard_size:
            if self.count > 0:
                self._flush()
                continue
            # the document alone is longer than a shard: cut it
            head = piece[:self.shard_size]
            self.buf, self.count = [head], head.size
            self._flush()
            rest = piece[self.shard_size:]
            piece = np.empty(rest.size + 1, dtype=np.uint16)
            piece[0] = self.eot
            piece[1:] = rest
        self.buf.append(piece)
        self.count += piece.size

    def close(self):
        """Writes the last shard, removes stale shards of this name left by an earlier run with
        more shards (a training glob would pick them up), and returns [(path, ntokens)]."""
        self._flush()
        pat = re.compile(re.escape(self.name) + r"_(val|train)_(\d{6})\.bin$")
        for fn in sorted(os.listdir(self.out_dir)):
            m = pat.match(fn)
            if m and int(m.group(2)) >= self.shard_index:
                print(f"removing stale shard from an earlier run: {os.path.join(self.out_dir, fn)}")
                os.remove(os.path.join(self.out_dir, fn))
        return self.written


def summarize(written):
    for path, n in written:
        print(f"wrote {path}: {n:,} tokens")


# --------------------------------------------------------------------------------------
# a text dataset -> shards (openwebtext.py, fineweb.py)


def positive_int(s):
    """argparse type: an integer >= 1."""
    import argparse
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def comma_list(choices, what):
    """argparse type: a comma-separated list of distinct names from choices ("a,b"); `what`
    names one of them in messages."""
    import argparse

    def parse(s):
        names = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in names if x not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(s)}: choose from {','.join(choices)}")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"a {what} is named twice: {s}")
        return names
    return parse


def add_shard_args(ap, default_out, out_help=None, shard_flags=("--shard_size",),
                   shard_size=DEFAULT_SHARD_SIZE, val_docs=None):
    """The flags every text-dataset script takes besides its input (shard_size and val_docs:
    the script's defaults)."""
    ap.add_argument("--out", default=default_out, help=out_help or f"output folder (default {default_out})")
    ap.add_argument(*shard_flags, dest="shard_size", type=positive_int, default=shard_size,
                    help=f"maximum tokens per shard (default {shard_size:,})")
    ap.add_argument("--val_docs", type=positive_int, default=val_docs,
                    help="put exactly the first N documents in the val shard (default " +
                         (f"{val_docs:,})" if val_docs else "none: the first shard of up to --shard_size tokens is val)"))
    ap.add_argument("--max_docs", type=positive_int, default=None, help="stop after this many input documents (dropped ones included)")
    ap.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                    help="tokenizer threads (default: number of cores, at most 8)")
    ap.add_argument("--vocab", default="gpt2", choices=["gpt2", "char"], help=VOCAB_HELP)


class HFSource:
    """The train split of a Hugging Face hub dataset, one document per row (its `column`, "text").
    streaming: rows are read as they download (FineWeb's samples are tens of GB), so the total
    is known only when the hub's metadata gives it."""

    def __init__(self, dataset, config=None, streaming=False, column="text"):
        self.name = dataset + (f" ({config})" if config else "")
        self.column = column
        try:
            import datasets
        except ImportError as e:
            raise DataError(f"downloading {self.name} needs the Hugging Face `datasets` package: "
                            "pip install datasets\n(or pass local files with --input PATH)") from e
        try:
            self.ds = datasets.load_dataset(dataset, name=config, split="train", streaming=streaming)
        except Exception as e:
            raise DataError(f"could not load {self.name} from the Hugging Face hub "
                            f"({type(e).__name__}: {e}); pass local files with --input PATH") from e
        self.total_docs = None
        try:
            self.total_docs = len(self.ds) if not streaming else self.ds.info.splits["train"].num_examples
        except Exception:
            pass  # a streamed dataset without split metadata: progress shows counts only
        self.n = 0

    def bytes_done(self):
        return self.n

    def __iter__(self):
        for i, row in enumerate(self.ds):
            self.n += 1
            text = row.get(self.column) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{self.name}: row {i} has no "{self.column}" string (keys: {sorted(row)[:8] if isinstance(row, dict) else type(row).__name__})')
            yield text


def write_text_dataset(src, name, what, args):
    """Tokenizes the documents of src (an iterable with bytes_done(), and total_bytes or
    total_docs) with args.vocab into `<args.out>/<name>[_char]_{val,train}_NNNNNN.bin` and the
    tokenizer file, as add_shard_args' flags say; `what` names the input in messages."""
    if hasattr(src, "total_bytes"):
        prog = Progress(src.total_bytes, "tokenizing", "bytes")
    else:
        prog = Progress(src.total_docs, "tokenizing", "docs")
    tok = get_tokenizer(args.vocab)
    writer = ShardWriter(args.out, dataset_name(name, args.vocab), tok.eot, shard_size=args.shard_size,
                         val_docs=args.val_docs, vocab_size=tok.vocab_size)

    docs = (d for d in iter_limited(src, args.max_docs) if d)  # skip empty documents
    ntok = 0
    drops = DropStats()

    def status():
        s = f"{drops.kept:,} docs {ntok / 1e6:.2f}M tokens"
        return s + f" ({drops.dropped:,} dropped)" if drops.dropped else s

    def report():
        prog.update(src.bytes_done(), status())

    for toks in kept_documents(tok, docs, drops, workers=args.workers, progress_cb=report):
        writer.add_document(toks)
        ntok += len(toks) + 1
    written = writer.close()
    prog.close(src.bytes_done(), status())

    if drops.kept == 0:
        if drops.dropped:
            raise DataError(f"all {drops.dropped:,} documents of {what} hold characters "
                            f"outside the {args.vocab} vocabulary; nothing to write. {drops.report()}")
        raise DataError(f"no documents found in {what}")

    summarize(written)
    if args.vocab != "gpt2":
        print(drops.report())
    write_tokenizer_for(tok, args.out)
    ntrain = sum(n for p, n in written[1:])
    print(f"{drops.kept:,} documents, {ntok:,} tokens: val {written[0][1]:,} tokens in 1 shard, "
          f"train {ntrain:,} tokens in {len(written) - 1} shards")
    if len(written) == 1:
        print("warning: everything fit in the val shard, no train shard was written; "
              "use a smaller --shard_size or --val_docs", file=sys.stderr)


def run_main(main):
    """Runs main(), turning DataError into a one-line message and exit status 1."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
