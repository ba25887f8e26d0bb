"""HellaSwag -> llm.c's multiple-choice eval file, for the trainers' HellaSwag eval.

    python data/hellaswag.py                              # downloads hellaswag_val.jsonl first
    python data/hellaswag.py --input path/to/hellaswag_val.jsonl
    python data/hellaswag.py --split train --max_examples 1000

Writes <out>/hellaswag_<split>.bin (default data/hellaswag/hellaswag_val.bin, the name llm.c
uses), in llm.c's eval file format (write_evalfile; the layout is described at the top of
data/common.py). Without --input, hellaswag_<split>.jsonl is downloaded from the HellaSwag
repository (https://github.com/rowanz/hellaswag) into --out first, unless it is already there.

Rendering, as llm.c's dev/data/hellaswag.py and the usual GPT-2 HellaSwag eval do it: the
context is the GPT-2 encoding of "ctx"; each of the 4 completions is the encoding of
" " + ending (the space joins it to the context, so its first word gets the same token it
would get in running text); the label is "label". The model's choice is the completion with the
least mean loss per token given the context.

--input: HellaSwag's .jsonl, one JSON object per line with at least "ctx" (a non-empty string),
"endings" (a list of 4 strings) and "label" (0..3, an integer or a string of one); other fields
("ind", "activity_label", "ctx_a", "ctx_b", "source_id", "split", "split_type") are ignored,
blank lines skipped. Examples are written in file order, as indices 0, 1, ...; --max_examples N
keeps the first N. --split only names the output (and the file downloaded). The test split has
no labels, so it cannot be scored and is refused.

Offline: set TIKTOKEN_CACHE_DIR to a folder with the GPT-2 BPE cache
(e.g. /work/shared/data/tiktoken_cache), and pass a local copy of the .jsonl with --input.
"""

import argparse
import json
import os
import sys

from common import DataError, download, get_tokenizer, positive_int, run_main, write_evalfile

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
HERE = os.path.dirname(os.path.abspath(__file__))
NUM_ENDINGS = 4


def parse_label(where, value):
    """HellaSwag's label: an int in its .jsonl, a string ("2") in some copies of it."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f'{where}: "label" must be an integer 0..{NUM_ENDINGS - 1}, got {value!r}')
    if not 0 <= value < NUM_ENDINGS:
        raise DataError(f'{where}: "label" is {value}; it must index one of the {NUM_ENDINGS} endings '
                        f"(0..{NUM_ENDINGS - 1})")
    return value


def read_examples(path, max_examples=None):
    """Yields (line number, ctx, endings, label) for the examples of a HellaSwag .jsonl, checked
    field by field so that a bad line is reported by its number rather than as a failed write."""
    if not os.path.isfile(path):
        raise DataError(f"input not found: {path}")
    n = 0
    with open(path, "r", encoding="utf-8") as f:
        lineno = 0
        while max_examples is None or n < max_examples:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 ({e})") from e
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e}") from e
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in ("ctx", "endings", "label") if k not in obj]
            if missing:
                hint = " (the test split has no labels)" if missing == ["label"] else ""
                raise DataError(f"{where}: missing field(s) {', '.join(repr(k) for k in missing)}{hint}")
            ctx, endings = obj["ctx"], obj["endings"]
            if not isinstance(ctx, str) or not ctx:
                raise DataError(f'{where}: "ctx" must be a non-empty string, got {ctx!r}')
            if not isinstance(endings, list) or len(endings) != NUM_ENDINGS:
                got = f"{len(endings)} endings" if isinstance(endings, list) else repr(endings)
                raise DataError(f'{where}: "endings" must be a list of {NUM_ENDINGS} strings, got {got}')
            for j, e in enumerate(endings):
                if not isinstance(e, str):
                    raise DataError(f'{where}: ending {j} must be a string, got {e!r}')
            yield lineno, ctx, endings, parse_label(where, obj["label"])
            n += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="local HellaSwag .jsonl (default: download hellaswag_<split>.jsonl into --out)")
    ap.add_argument("--out", default=os.path.join(HERE, "hellaswag"), help="output folder")
    ap.add_argument("--split", default="val", choices=["val", "train", "test"],
                    help="which split: names the output hellaswag_<split>.bin and the file downloaded "
                         "(default val; test has no labels and is refused)")
    ap.add_argument("--max_examples", type=positive_int, default=None, help="keep only the first N examples")
    args = ap.parse_args()

    if args.split == "test":
        raise DataError("the HellaSwag test split has no labels (they are held back for the leaderboard), "
                        "so it cannot be scored; use --split val (the usual eval) or --split train")
    path = args.input
    if path is None:
        url = URL.format(split=args.split)
        path = download(url, os.path.join(args.out, f"hellaswag_{args.split}.jsonl"),
                        hint="If this machine is offline, pass a local copy with --input FILE.jsonl")

    rows = list(read_examples(path, args.max_examples))  # every line checked before the tokenizer loads
    if not rows:
        raise DataError(f"no examples found in {path}")
    tok = get_tokenizer("gpt2")
    examples = []
    for lineno, ctx, endings, label in rows:
        ex = {"label": label, "ctx_tokens": tok.encode(ctx), "ending_tokens": [tok.encode(" " + e) for e in endings]}
        # the format's one limit a valid line can break; checked here to name the line
        nbytes = 2 * (6 + len(ex["ctx_tokens"]) + sum(1 + len(e) for e in ex["ending_tokens"]))
        if nbytes >= 2**16:
            raise DataError(f"{path}:{lineno}: the example takes {nbytes:,} bytes once tokenized; the eval "
                            f"file's uint16 size field allows at most {2**16 - 2:,}")
        examples.append(ex)

    out = os.path.join(args.out, f"hellaswag_{args.split}.bin")
    n, longest = write_evalfile(out, examples)
    ntok = max(len(x["ctx_tokens"]) + max(len(e) for e in x["ending_tokens"]) for x in examples)
    print(f"wrote {out}: {n:,} examples, longest example {longest:,} bytes")
    print(f"longest context + completion: {ntok} tokens")


if __name__ == "__main__":
    sys.exit(run_main(main))
