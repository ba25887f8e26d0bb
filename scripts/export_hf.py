"""A GPT-2 checkpoint (llm.c's format, as the trainers write it) -> a Hugging Face model folder.

    python scripts/export_hf.py out/model_00010000.bin out/hf
    python scripts/export_hf.py out/model_00010000.bin out/hf --dtype float32 --tokenizer_dir ../shared/data/gpt2

The folder loads with transformers' GPT2LMHeadModel.from_pretrained (and so in lm-evaluation-harness
with --model hf --model_args pretrained=out/hf): config.json and model.safetensors, and for the
GPT-2 vocabulary also the tokenizer (vocab.json and merges.txt: copied from --tokenizer_dir, which
holds GPT-2's encoder.json and vocab.bpe, or downloaded from OpenAI's GPT-2 release).
Structured models (version 10) have no GPT-2 equivalent and are refused. The mapping is
scripts/gpt2_hf.py's. --dtype bfloat16 (default for a bf16 checkpoint) keeps the file's bits;
from fp32 it rounds to nearest even. scripts/import_hf.py goes the other way.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np

from gpt2_hf import GPT2_VOCAB, DataError, _atomic_write, hf_tensors, read_checkpoint, to_bf16_bits, write_safetensors

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
from common import download, run_main  # noqa: E402

GPT2_FILES = {  # OpenAI's names -> Hugging Face's
    "encoder.json": "vocab.json",
    "vocab.bpe": "merges.txt",
}
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="llm.c-format GPT-2 checkpoint (version 3 or 5)")
    ap.add_argument("out", help="output folder (created)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="tensor type in model.safetensors (default: the checkpoint's: bfloat16 for version 5, float32 for 3)")
    ap.add_argument("--tokenizer_dir", default=None,
                    help="folder with GPT-2's encoder.json and vocab.bpe (default: download them); ignored unless V is 50257")
    ap.add_argument("--no_tokenizer", action="store_true", help="write the model only")
    args = ap.parse_args()

    h, t = read_checkpoint(args.checkpoint)
    dtype = args.dtype or ("bfloat16" if h["version"] == 5 else "float32")
    tensors = hf_tensors(h, t)
    for k, a in tensors.items():
        if a.dtype == np.dtype("<u2"):  # bf16 bits from a version-5 file
            tensors[k] = a if dtype == "bfloat16" else (a.astype("<u4") << 16).view("<f4")
        else:
            tensors[k] = to_bf16_bits(a) if dtype == "bfloat16" else a.astype("<f4")
    os.makedirs(args.out, exist_ok=True)
    write_safetensors(os.path.join(args.out, "model.safetensors"), tensors, "BF16" if dtype == "bfloat16" else "F32",
                      {"format": "pt", "source": os.path.basename(args.checkpoint)})
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": h["V"], "n_positions": h["T"],
              "n_ctx": h["T"], "n_embd": h["C"], "n_layer": h["L"], "n_head": h["NH"], "n_inner": None,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
              "attn_pdrop": 0.0, "initializer_range": 0.02, "tie_word_embeddings": True, "torch_dtype": dtype}
    if h["V"] == GPT2_VOCAB:
        config["bos_token_id"] = config["eos_token_id"] = GPT2_VOCAB - 1
    _atomic_write(os.path.join(args.out, "config.json"), [json.dumps(config, indent=2).encode() + b"\n"])
    print(f"wrote {args.out}/model.safetensors ({len(tensors)} tensors, {dtype}) and config.json: "
          f"GPT-2 L {h['L']} heads {h['NH']} C {h['C']} V {h['V']} T {h['T']}")

    if h["V"] != GPT2_VOCAB or args.no_tokenizer:
        print("no tokenizer written" + ("" if args.no_tokenizer else f": a vocabulary of {h['V']}, not GPT-2's"))
        return
    for ours, theirs in GPT2_FILES.items():
        dst = os.path.join(args.out, theirs)
        if args.tokenizer_dir:
            src = os.path.join(args.tokenizer_dir, ours)
            if not os.path.isfile(src):
                raise DataError(f"--tokenizer_dir {args.tokenizer_dir}: no {ours} there (GPT-2's {ours} is needed)")
            shutil.copyfile(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
        else:
            download(GPT2_URL + ours, dst, hint="offline, pass a folder holding encoder.json and vocab.bpe with --tokenizer_dir")
    _atomic_write(os.path.join(args.out, "tokenizer_config.json"),
                  [json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": h["T"]}, indent=2).encode() + b"\n"])
    print(f"wrote the GPT-2 tokenizer: {', '.join(GPT2_FILES.values())}, tokenizer_config.json")


if __name__ == "__main__":
    sys.exit(run_main(main))
