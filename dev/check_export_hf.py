"""Checks scripts/export_hf.py end to end: the exported folder, loaded by transformers'
GPT2LMHeadModel, gives the trainer's own validation loss on the same tokens. CHECKPOINT may also
be a Hugging Face model folder (e.g. from GPT2LMHeadModel(GPT2Config(...)).save_pretrained): then
scripts/import_hf.py turns it into the trainer's checkpoint, and transformers runs the folder as
it is, which checks the import instead.

    python dev/check_export_hf.py CHECKPOINT SHARD [--trainer ./train_gpt2] [-b 4] [-t 64] [--eval FILE]

Needs PyTorch and transformers (not in requirements.txt: CI does not run this; tests/python/
test_export_hf.py checks the file layout there). The trainer's first validation batch is the
shard's tokens [0, B*T] (inputs [0, B*T), targets shifted by one): the same tokens go through the
exported model in float32. Exits 1 when the two losses differ by more than --tol.

--eval FILE (an eval file in llm.c's format, data/hellaswag.py's output) also scores it both ways:
the trainer's -h 1 count at step 0, and here each ending's mean loss over its tokens given the
context, in transformers, the least winning; the two counts must be equal (rows must fit -t + 1).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("shard", help="an llm.c token shard (its first B*T+1 tokens are scored)")
    ap.add_argument("--trainer", default=os.path.join(REPO_ROOT, "train_gpt2"))
    ap.add_argument("-b", type=int, default=4)
    ap.add_argument("-t", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-4, help="largest |loss difference| accepted (fp32 both ways)")

    import torch
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    ap.add_argument("--eval", default=None, help="also compare the HellaSwag-style count on this eval file")
    args = ap.parse_args()
    keep = tempfile.TemporaryDirectory()
    hf_dir = None
    if os.path.isdir(args.checkpoint):
        hf_dir = args.checkpoint
        ckpt = os.path.join(keep.name, "imported.bin")
        r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "import_hf.py"), args.checkpoint, ckpt],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"import_hf.py failed: {r.stderr.strip()}")
        print(r.stdout.strip())
        args.checkpoint = ckpt
    cmd = [args.trainer, "-e", args.checkpoint, "-i", args.shard, "-j", args.shard, "-b", str(args.b), "-t", str(args.t),
           "-x", "1", "-v", "1", "-m", "1", "-s", "0"]
    out = subprocess.run(cmd + (["-h", "1", "-hf", args.eval] if args.eval else []), capture_output=True, text=True)
    m = re.search(r"^val loss ([0-9.]+)$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        sys.exit(f"the trainer failed (exit {out.returncode}): {out.stderr.strip()[-400:]}")
    ours = float(m.group(1))

    if hf_dir is None:
        hf_dir = os.path.join(keep.name, "exported")
        r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "export_hf.py"), args.checkpoint, hf_dir,
                            "--dtype", "float32", "--no_tokenizer"], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"export_hf.py failed: {r.stderr.strip()}")
    model = GPT2LMHeadModel.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    n = args.b * args.t
    toks = np.fromfile(args.shard, dtype="<u2", offset=1024, count=n + 1).astype(np.int64)
    x = torch.from_numpy(toks[:n]).view(args.b, args.t)
    y = torch.from_numpy(toks[1:n + 1]).view(args.b, args.t)
    with torch.no_grad():
        logits = model(x).logits
    theirs = F.cross_entropy(logits.reshape(n, -1), y.reshape(n)).item()
    diff = abs(ours - theirs)
    print(f"trainer val loss {ours:.6f}, transformers {theirs:.6f}, |diff| {diff:.2e} (tol {args.tol:g})")
    ok = diff <= args.tol
    if args.eval:
        sys.path.insert(0, os.path.join(REPO_ROOT, "data"))
        from common import read_evalfile
        m = re.search(r"^HellaSwag: (\d+)/(\d+) = ", out.stdout, re.M)
        right = 0
        examples = read_evalfile(args.eval)
        with torch.no_grad():
            for ex in examples:
                ctx, means = ex["ctx_tokens"], []
                for end in ex["ending_tokens"]:
                    seq = torch.tensor([list(ctx) + list(end)])
                    lp = F.cross_entropy(model(seq[:, :-1]).logits[0], seq[0, 1:], reduction="none")
                    means.append(lp[len(ctx) - 1:].mean().item())
                right += int(np.argmin(means)) == ex["label"]
        print(f"eval {args.eval}: trainer {m.group(1) if m else '?'}/{len(examples)}, transformers {right}/{len(examples)}")
        ok = ok and m is not None and int(m.group(1)) == right
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
