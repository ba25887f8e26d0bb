"""OpenWebText -> llm.c token shards.

    python data/openwebtext.py                           # Hugging Face "Skylion007/openwebtext"
    python data/openwebtext.py --input openwebtext.tar.xz
    python data/openwebtext.py --input docs.jsonl.xz --shard_size 10000000

--input may be
  * the original release `openwebtext.tar.xz`, one of its `urlsf_subsetNN-M_data.xz` files
    (each an xz-compressed tar of .txt documents), or a folder of them; every .txt is one
    document, cleaned as the Hugging Face loader does (runs of 3+ newlines become 2,
    surrounding whitespace stripped);
  * a .jsonl / .jsonl.xz / .jsonl.gz file with one {"text": ...} document per line;
  * a folder of .txt files (one document each, unchanged);
  * a plain text file: one document, or with --split_paragraphs one document per paragraph
    (paragraphs are separated by runs of blank lines).
Without --input the dataset is downloaded from the Hugging Face hub (needs `pip install
datasets`), as llm.c's fineweb.py does.

Output in --out (default data/openwebtext/): openwebtext_val_000000.bin,
openwebtext_train_000001.bin, ... and gpt2_tokenizer.bin. With --vocab char:
openwebtext_char_val_000000.bin, openwebtext_char_train_000001.bin, ... and char_tokenizer.bin
(the GPT-2 shards of the same folder are left alone).

Sharding rule (llm.c's): every document is preceded by EOT (50256); documents are packed in
input order into shards of at most --shard_size tokens, and the FIRST shard is the validation
shard, all later ones are train shards. A document is never split across shards unless it
alone is longer than --shard_size. With --val_docs N the validation shard holds exactly the
first N documents instead (of any size). Empty documents are skipped.

--vocab char: the 96-symbol character vocabulary, one token per character: id 0 = "\\n",
id 1 = " ", ids 2..95 = ASCII 33 ("!") .. 126 ("~"). "\\n" (id 0) is also the EOT token that
precedes every document. A document that, after the cleaning above, holds any other character
(a tab, "\\r", any non-ASCII character such as curly quotes) is dropped whole; the numbers of
kept and dropped documents are printed. --max_docs counts input documents (kept or dropped),
--val_docs counts kept ones. A model for this data needs vocab_size = 96 in its config (the
trainer pads it to 128). The trainer looks for gpt2_tokenizer.bin beside the train shards, so
pass the char tokenizer with -tk, e.g. -tk data/openwebtext/char_tokenizer.bin.

Offline: set TIKTOKEN_CACHE_DIR to a folder with the GPT-2 BPE cache
(e.g. /work/shared/data/tiktoken_cache).
"""

import argparse
import os
import sys

from common import (DEFAULT_SHARD_SIZE, VOCAB_HELP, DataError, DocSource, DropStats, Progress, ShardWriter,
                    get_tokenizer, iter_limited, run_main, summarize, tokenize_stream, write_tokenizer_for)

HERE = os.path.dirname(os.path.abspath(__file__))
HF_DATASET = "Skylion007/openwebtext"


class HFSource:
    """The train split of the Hugging Face dataset, one document per row."""

    def __init__(self):
        try:
            import datasets
        except ImportError as e:
            raise DataError("downloading OpenWebText needs the Hugging Face `datasets` package: "
                            "pip install datasets\n(or pass local files with --input PATH)") from e
        try:
            self.ds = datasets.load_dataset(HF_DATASET, split="train")
        except Exception as e:
            raise DataError(f"could not load {HF_DATASET} from the Hugging Face hub "
                            f"({type(e).__name__}: {e}); pass local files with --input PATH") from e
        self.total_docs = len(self.ds)
        self.n = 0

    def bytes_done(self):
        return self.n

    def __iter__(self):
        for row in self.ds:
            self.n += 1
            yield row["text"]


def positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="local file or folder (default: download from the Hugging Face hub)")
    ap.add_argument("--out", default=os.path.join(HERE, "openwebtext"), help="output folder")
    ap.add_argument("--shard_size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                    help=f"maximum tokens per shard (default {DEFAULT_SHARD_SIZE:,})")
    ap.add_argument("--val_docs", type=positive_int, default=None,
                    help="put exactly the first N documents in the val shard "
                         "(default: the first shard of up to --shard_size tokens is val)")
    ap.add_argument("--max_docs", type=positive_int, default=None, help="stop after this many input documents (dropped ones included)")
    ap.add_argument("--split_paragraphs", action="store_true",
                    help="split plain text files into one document per blank-line-separated paragraph")
    ap.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                    help="tokenizer threads (default: number of cores, at most 8)")
    ap.add_argument("--vocab", default="gpt2", choices=["gpt2", "char"], help=VOCAB_HELP)
    args = ap.parse_args()

    if args.input is not None:
        src = DocSource(args.input, split_paragraphs=args.split_paragraphs)
        prog = Progress(src.total_bytes, "tokenizing", "bytes")
    else:
        src = HFSource()
        prog = Progress(src.total_docs, "tokenizing", "docs")
    tok = get_tokenizer(args.vocab)
    name = "openwebtext" if args.vocab == "gpt2" else f"openwebtext_{args.vocab}"
    writer = ShardWriter(args.out, name, tok.eot, shard_size=args.shard_size,
                         val_docs=args.val_docs, vocab_size=tok.vocab_size)

    docs = (d for d in iter_limited(src, args.max_docs) if d)  # skip empty documents
    ndocs = 0
    ntok = 0
    drops = DropStats()

    def status():
        s = f"{ndocs:,} docs {ntok / 1e6:.2f}M tokens"
        return s + f" ({drops.dropped:,} dropped)" if drops.dropped else s

    def report():
        prog.update(src.bytes_done(), status())

    for text, toks in tokenize_stream(tok, docs, workers=args.workers, progress_cb=report, with_text=True):
        if toks is None:  # a character outside the char vocabulary: drop the whole document
            drops.add_dropped(text, tok)
            continue
        writer.add_document(toks)
        ndocs += 1
        ntok += len(toks) + 1
    drops.kept = ndocs
    written = writer.close()
    prog.close(src.bytes_done(), status())

    if ndocs == 0:
        if drops.dropped:
            raise DataError(f"all {drops.dropped:,} documents of {args.input or HF_DATASET} hold characters "
                            f"outside the {args.vocab} vocabulary; nothing to write. {drops.report()}")
        raise DataError(f"no documents found in {args.input or HF_DATASET}")

    summarize(written)
    if args.vocab != "gpt2":
        print(drops.report())
    write_tokenizer_for(tok, args.out)
    ntrain = sum(n for p, n in written[1:])
    print(f"{ndocs:,} documents, {ntok:,} tokens: val {written[0][1]:,} tokens in 1 shard, "
          f"train {ntrain:,} tokens in {len(written) - 1} shards")
    if len(written) == 1:
        print("warning: everything fit in the val shard, no train shard was written; "
              "use a smaller --shard_size or --val_docs", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_main(main))
