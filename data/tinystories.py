"""TinyStories -> llm.c token files, named as llm.c's dev/data/tinystories.py names them.

    python data/tinystories.py                                        # downloads the archive (1.6 GB) first
    python data/tinystories.py --input TinyStories_all_data.tar.gz    # or the folder it unpacks to
    python data/tinystories.py --max_files 3                          # data00 (val) + data01..02: a quick run
    ./train_gpt2 -e d6 -i data/tinystories/TinyStories_train.bin -j data/tinystories/TinyStories_val.bin

The archive (roneneldan/TinyStories on the Hugging Face hub) holds data00.json ... data49.json,
each a JSON list of stories ({"story": "...", ...}). As in llm.c: data00.json, the first by name,
is the val split and all the others, in name order, the train split; each story is stripped of
its surrounding whitespace and preceded by EOT (50256). The archive is read in one streaming
pass, without unpacking it (the files need not come in name order: each is tokenized apart).

Writes into --out (default data/tinystories/): TinyStories_val.bin, TinyStories_train.bin (one
file each, as llm.c's; ~470M train tokens for the whole archive) and gpt2_tokenizer.bin. With
--vocab char: TinyStories_char_{val,train}.bin and char_tokenizer.bin, stories with a character
outside the 96 dropped (see data/openwebtext.py --help).

Offline: give the archive with --input, and set TIKTOKEN_CACHE_DIR to a folder with the GPT-2
BPE cache.
"""

import argparse
import json
import os
import re
import sys
import tarfile

import numpy as np

from common import (VOCAB_HELP, DataError, DropStats, dataset_name, download, get_tokenizer, kept_documents,
                    positive_int, run_main, write_splits)

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
HERE = os.path.dirname(os.path.abspath(__file__))
JSON_NAME = re.compile(r"(^|/)data\d+\.json$")


def stories_of(name, data):
    """The stories of one dataNN.json file's bytes, stripped."""
    try:
        rows = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{name}: not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise DataError(f"{name}: expected a JSON list of stories, found a {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        story = row.get("story") if isinstance(row, dict) else None
        if not isinstance(story, str):
            raise DataError(f'{name}: entry {i} has no "story" string')
        out.append(story.strip())
    return out


def json_files(path):
    """(name, bytes) of every dataNN.json in the archive or folder, in the order they are read."""
    if os.path.isdir(path):
        for root, _, names in os.walk(path):
            for n in sorted(names):
                if JSON_NAME.search(n):
                    with open(os.path.join(root, n), "rb") as f:
                        yield os.path.join(root, n), f.read()
        return
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                if m.isfile() and JSON_NAME.search(m.name):
                    yield f"{path}:{m.name}", tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot read {path} as a tar archive ({type(e).__name__}: {e}); give "
                        "TinyStories_all_data.tar.gz or the folder it unpacks to") from e


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="TinyStories_all_data.tar.gz or the folder of dataNN.json files (default: download the archive into --out)")
    ap.add_argument("--out", default=os.path.join(HERE, "tinystories"), help="output folder (default data/tinystories)")
    ap.add_argument("--max_files", type=positive_int, help="only the first N dataNN.json files by name (the first is val; N >= 2)")
    ap.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1), help="tokenizer threads")
    ap.add_argument("--vocab", default="gpt2", choices=["gpt2", "char"], help=VOCAB_HELP)
    args = ap.parse_args()
    if args.max_files is not None and args.max_files < 2:
        raise DataError(f"--max_files {args.max_files}: give at least 2 (the first file is the val split)")
    path = args.input
    if path is None:
        os.makedirs(args.out, exist_ok=True)
        path = download(URL, os.path.join(args.out, "TinyStories_all_data.tar.gz"),
                        "If this machine is offline, pass a local copy with --input PATH")
    elif not os.path.exists(path):
        raise DataError(f"input not found: {path}")

    tok = get_tokenizer(args.vocab)
    drops = DropStats()
    parts = {}  # file number -> its tokens, every story led by EOT
    for name, data in json_files(path):
        key = int(re.search(r"data(\d+)\.json$", name).group(1))
        if key in parts:
            raise DataError(f"{name}: a second data{key:02d}.json; give one archive or folder")
        if args.max_files is not None and len(parts) >= args.max_files and key > max(parts):
            continue  # not among the first --max_files by name
        stories = [s for s in stories_of(name, data) if s]
        toks = []
        for t in kept_documents(tok, stories, drops, workers=args.workers):
            toks.append(tok.eot)
            toks.extend(t)
        parts[key] = np.array(toks, dtype=np.uint16)
        print(f"{name}: {len(stories):,} stories, {parts[key].size:,} tokens")
        if args.max_files is not None and len(parts) > args.max_files:
            del parts[max(parts)]
    keys = sorted(parts)
    if len(keys) < 2:
        raise DataError(f"{path} holds {len(keys)} dataNN.json file(s); the first is the val split, so at least 2 are needed")
    if args.vocab != "gpt2":
        print(drops.report("stories"))
    splits = [("val", np.concatenate([parts[k] for k in keys[:1]])), ("train", np.concatenate([parts[k] for k in keys[1:]]))]
    for split, toks in splits:
        if toks.size == 0:
            raise DataError(f"no story of the {split} split is left (all dropped); nothing written")

    write_splits(args.out, dataset_name("TinyStories", args.vocab), splits, tok)
    print(f"val: data{keys[0]:02d}.json; train: data{keys[1]:02d}.json .. data{keys[-1]:02d}.json ({len(keys) - 1} files)")


if __name__ == "__main__":
    sys.exit(run_main(main))
