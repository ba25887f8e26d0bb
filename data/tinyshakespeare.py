"""Tiny Shakespeare -> llm.c token shards.

    python data/tinyshakespeare.py                       # downloads input.txt first
    python data/tinyshakespeare.py --input path/to/input.txt

Writes into --out (default data/tinyshakespeare/):
    tiny_shakespeare_val.bin    the first --val_tokens tokens (default 32,768)
    tiny_shakespeare_train.bin  the rest
    gpt2_tokenizer.bin          the GPT-2 tokenizer in llm.c's format
With --vocab char (the 96-symbol character vocabulary, see below):
    tiny_shakespeare_char_val.bin, tiny_shakespeare_char_train.bin, char_tokenizer.bin

Splitting, as llm.c's dev/data/tinyshakespeare.py does it: the text is split on "\\n\\n"
into sections, each section is one document, preceded by EOT (50256). Every section except
the last is encoded as section + "\\n\\n" (so the separator stays at the end of the section
it followed, and concatenating the decoded documents gives back the input text exactly); the
last section is encoded as is. Each section is encoded on its own with GPT-2's
encode_ordinary. The token stream is then cut after --val_tokens tokens.

One difference from llm.c: that cut usually falls inside a section, and llm.c's train file
then starts mid-section. Here the train file starts with an extra EOT instead, so that every
shard starts with EOT; --no_train_eot gives llm.c's output byte for byte.

--vocab char: one token per character; id 0 = "\\n", id 1 = " ", ids 2..95 = ASCII 33 ("!")
.. 126 ("~"). "\\n" (id 0) is also the EOT token, so each document still starts with EOT (which
reads as one extra newline). The splitting and the val cut are the same as above. A document
(section) with any character outside the 96 is dropped whole, and the counts of kept and
dropped documents are printed (Tiny Shakespeare itself has none to drop). A model for this data
needs vocab_size = 96 in its config (the trainer pads it to 128); the tokenizer is written as
char_tokenizer.bin, which the trainer does not find by itself (it looks for gpt2_tokenizer.bin):
pass it with -tk, e.g. -tk data/tinyshakespeare/char_tokenizer.bin.

Offline: set TIKTOKEN_CACHE_DIR to a folder with the GPT-2 BPE cache
(e.g. /work/shared/data/tiktoken_cache).
"""

import argparse
import os
import sys

import numpy as np

from common import (VOCAB_HELP, DataError, DropStats, dataset_name, download, get_tokenizer, kept_documents, run_main,
                    write_splits)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


def split_documents(text):
    """The documents of the text, as documented above (their concatenation is the text)."""
    sections = text.split("\n\n")
    return [s + "\n\n" if i != len(sections) - 1 else s for i, s in enumerate(sections)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="local input.txt (default: download it into --out)")
    ap.add_argument("--out", default=os.path.join(HERE, "tinyshakespeare"), help="output folder")
    ap.add_argument("--val_tokens", type=int, default=32768, help="tokens in the val split (default 32768)")
    ap.add_argument("--vocab", default="gpt2", choices=["gpt2", "char"], help=VOCAB_HELP)
    ap.add_argument("--no_train_eot", action="store_true",
                    help="do not start the train split with an extra EOT (identical to llm.c's output)")
    args = ap.parse_args()

    path = args.input
    if path is None:
        path = os.path.join(args.out, "input.txt")
        os.makedirs(args.out, exist_ok=True)
        download(URL, path, "If this machine is offline, pass a local copy with --input PATH/input.txt")
    if not os.path.isfile(path):
        raise DataError(f"input not found: {path}")
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e})") from e

    tok = get_tokenizer(args.vocab)
    docs = split_documents(text)
    drops = DropStats()
    tokens = []
    for t in kept_documents(tok, docs, drops):
        tokens.append(tok.eot)
        tokens.extend(t)
    tokens = np.array(tokens, dtype=np.uint16)
    if args.vocab != "gpt2":
        print(drops.report("documents (sections)"))
    if not 0 < args.val_tokens < tokens.size:
        raise DataError(f"--val_tokens must be between 1 and {tokens.size - 1} (the text has {tokens.size} tokens)")
    val = tokens[:args.val_tokens]
    train = tokens[args.val_tokens:]
    if train[0] != tok.eot and not args.no_train_eot:
        train = np.concatenate([np.array([tok.eot], dtype=np.uint16), train])
    print(f"{path}: {len(text):,} characters, {drops.kept:,} documents, {tokens.size:,} tokens incl. EOTs")

    write_splits(args.out, dataset_name("tiny_shakespeare", args.vocab), (("val", val), ("train", train)), tok)
    print(f"train: {train.size:,} tokens, val: {val.size:,} tokens")


if __name__ == "__main__":
    sys.exit(run_main(main))
