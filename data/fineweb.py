"""FineWeb (or FineWeb-Edu) -> llm.c token shards, as llm.c's dev/data/fineweb.py names them.

    python data/fineweb.py                          # FineWeb sample-10BT from the Hugging Face hub
    python data/fineweb.py -t edu -v 100B           # FineWeb-Edu sample-100BT
    python data/fineweb.py --input fineweb_parquet/ --max_docs 1000000

Without --input the sample is streamed from the hub (needs `pip install datasets`): rows are
tokenized as they arrive, so the 10B sample's ~30 GB of Parquet need not sit on disk first.
--input takes what the hub holds, downloaded beforehand (e.g. `huggingface-cli download
HuggingFaceFW/fineweb --repo-type dataset --include "sample/10BT/*"`): a .parquet file or a
folder of them, read in sorted order, one document per row of the "text" column (needs
pyarrow); also .jsonl(.xz|.gz) with a "text" field per line, and everything else
data/openwebtext.py reads.

Output, as llm.c's script writes it and its run scripts expect: fineweb10B/fineweb_val_000000.bin,
fineweb10B/fineweb_train_000001.bin, ... (-t edu: edu_fineweb10B/edu_fineweb_*; -v 100B:
fineweb100B/...), and gpt2_tokenizer.bin; --out changes the folder. Shards hold up to
--shard_size tokens (llm.c's 10^8), every document led by EOT (50256), the first shard is val.
Unlike llm.c's script, a document is not split across two shards unless it alone is longer than
a shard (data/openwebtext.py's rule), so shards end at document boundaries. --vocab char writes
the 96-symbol character vocabulary instead (fineweb_char_*; see data/openwebtext.py --help).

Offline, set TIKTOKEN_CACHE_DIR to a folder with the GPT-2 BPE cache.
"""

import argparse
import os
import sys

from common import DocSource, HFSource, add_shard_args, run_main, write_text_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
# (-t, -v) -> the hub dataset, its sample's config, llm.c's folder and shard names
DATASETS = {"classic": ("HuggingFaceFW/fineweb", "fineweb{v}", "fineweb"),
            "edu": ("HuggingFaceFW/fineweb-edu", "edu_fineweb{v}", "edu_fineweb")}
VERSIONS = {"10B": "sample-10BT", "100B": "sample-100BT"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-t", "--type", default="classic", choices=sorted(DATASETS), help="FineWeb or FineWeb-Edu (default classic)")
    ap.add_argument("-v", "--version", default="10B", choices=sorted(VERSIONS), help="the hub's sample: 10B or 100B tokens (default 10B)")
    ap.add_argument("--input", help="local .parquet/.jsonl file or folder (default: stream the sample from the Hugging Face hub)")
    add_shard_args(ap, None, out_help="output folder (default: data/fineweb10B, data/edu_fineweb10B, ... as -t and -v say)",
                   shard_flags=("-s", "--shard_size"))
    args = ap.parse_args()
    dataset, folder, name = DATASETS[args.type]
    if args.out is None:
        args.out = os.path.join(HERE, folder.format(v=args.version))
    if args.input is not None:
        src = DocSource(args.input)
        what = args.input
    else:
        src = HFSource(dataset, VERSIONS[args.version], streaming=True)
        what = src.name
    write_text_dataset(src, name, what, args)


if __name__ == "__main__":
    sys.exit(run_main(main))
