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
  * a .parquet file: one document per row of its "text" column (needs pyarrow);
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

from common import DocSource, HFSource, add_shard_args, run_main, write_text_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
HF_DATASET = "Skylion007/openwebtext"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="local file or folder (default: download from the Hugging Face hub)")
    ap.add_argument("--split_paragraphs", action="store_true",
                    help="split plain text files into one document per blank-line-separated paragraph")
    add_shard_args(ap, os.path.join(HERE, "openwebtext"))
    args = ap.parse_args()
    if args.input is not None:
        src = DocSource(args.input, split_paragraphs=args.split_paragraphs)
    else:
        src = HFSource(HF_DATASET)
    write_text_dataset(src, "openwebtext", args.input or HF_DATASET, args)


if __name__ == "__main__":
    sys.exit(run_main(main))
