"""synthetic_shards.py: small llm.c-format shards of learnable text for the command-line tests.

Documents are EOT (50256) followed by a repeating pattern of 8 random tokens below 300, so a tiny
model's loss falls quickly. Writes OUT/syn_train_00000K.bin (--train_shards of them, equal parts)
and OUT/syn_val_000000.bin: --val_docs more documents of 100 tokens, or with --val_docs 0 the
first 3000 train tokens. --noise_at K --noise_len N replaces train tokens K..K+N-1 with uniform
random tokens from [--noise_lo, --noise_hi) (the whole vocabulary by default): a stretch of the data
that no model predicts (an outlier); one token repeated (hi = lo + 1) is an outlier in the gradients.
--eval_examples N also writes OUT/syn_eval.bin, a HellaSwag-style eval file (llm.c's format) of N
examples: the context is a document's start (EOT + its pattern twice), the right ending the
pattern's next 4 tokens, the 3 wrong ones 4 tokens from 40000..49999, which no shard holds (the
label cycles 0, 1, 2, 3). A model trained on the shards a few steps tells them apart.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
from common import write_evalfile, write_shard  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs", type=int, default=120)
    ap.add_argument("--train_shards", type=int, default=1)
    ap.add_argument("--val_docs", type=int, default=20)
    ap.add_argument("--noise_at", type=int, default=0)
    ap.add_argument("--noise_len", type=int, default=0)
    ap.add_argument("--noise_lo", type=int, default=0)
    ap.add_argument("--noise_hi", type=int, default=50257)
    ap.add_argument("--eval_examples", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    def doc(n):
        base = rng.integers(0, 300, size=8)
        return np.concatenate([[50256], np.tile(base, n // 8 + 1)[:n]])

    train = np.concatenate([doc(int(rng.integers(40, 200))) for _ in range(args.docs)]).astype(np.uint16)
    if args.noise_len > 0:
        if args.noise_at < 0 or args.noise_at + args.noise_len > len(train):
            sys.exit("--noise_at %d --noise_len %d: outside the %d train tokens" % (args.noise_at, args.noise_len, len(train)))
        train[args.noise_at:args.noise_at + args.noise_len] = rng.integers(args.noise_lo, args.noise_hi, size=args.noise_len)
    if args.val_docs > 0:
        val = np.concatenate([doc(100) for _ in range(args.val_docs)]).astype(np.uint16)
    else:
        val = train[:3000]
    n, parts = len(train), args.train_shards
    for k in range(parts):  # shard k holds tokens [k*n//parts, (k+1)*n//parts)
        write_shard(os.path.join(args.out, "syn_train_%06d.bin" % (k + 1)), train[k * n // parts:(k + 1) * n // parts])
    write_shard(os.path.join(args.out, "syn_val_000000.bin"), val)
    examples = []
    for i in range(args.eval_examples):
        base = [int(t) for t in rng.integers(0, 300, size=8)]
        endings = [[int(t) for t in rng.integers(40000, 50000, size=4)] for _ in range(4)]
        endings[i % 4] = base[:4]
        examples.append({"label": i % 4, "ctx_tokens": [50256] + base + base, "ending_tokens": endings})
    if examples:
        write_evalfile(os.path.join(args.out, "syn_eval.bin"), examples)


if __name__ == "__main__":
    main()
