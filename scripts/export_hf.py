"""A GPT-2 checkpoint (llm.c's format, as the trainers write it) -> a Hugging Face model folder.

    python scripts/export_hf.py out/model_00010000.bin out/hf
    python scripts/export_hf.py out/model_00010000.bin out/hf --dtype float32 --tokenizer_dir ../shared/data/gpt2

The folder loads with transformers' GPT2LMHeadModel.from_pretrained (and so in lm-evaluation-harness
with --model hf --model_args pretrained=out/hf): config.json and model.safetensors, and for the
GPT-2 vocabulary also the tokenizer (vocab.json and merges.txt: copied from --tokenizer_dir, which
holds GPT-2's encoder.json and vocab.bpe, or downloaded from OpenAI's GPT-2 release).

Checkpoint: 256 int32 header (magic 20240326; version 3 = fp32 or 5 = bf16; max T, vocab V, layers
L, heads, channels C, padded vocab Vp), then wte (Vp, C), wpe (T, C), and per layer, each as one
(L, ...) block: ln1 w/b, qkv w (3C, C)/b, attention proj w (C, C)/b, ln2 w/b, fc w (4C, C)/b, fc
proj w (C, 4C)/b; then the final LayerNorm w/b. Structured models (version 10) have no GPT-2
equivalent and are refused.

Mapping: transformers' GPT-2 keeps its linear weights as Conv1D, (in, out), so each of ours (out,
in) is transposed; wte loses the padding rows past V; the output layer is wte (tied), as here.
GELU is the tanh form (gelu_new) and LayerNorm's epsilon 1e-5, as in llm.c. --dtype bfloat16
(default for a bf16 checkpoint) keeps the file's bits; from fp32 it rounds to nearest even.
"""

import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
from common import DataError, _atomic_write, download, run_main  # noqa: E402

MODEL_MAGIC = 20240326
GPT2_VOCAB = 50257
GPT2_FILES = {  # ours -> Hugging Face's names
    "encoder.json": "vocab.json",
    "vocab.bpe": "merges.txt",
}
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def read_checkpoint(path):
    """Returns (header dict, {name: array}) with llm.c's tensor names and shapes; bf16 stays as
    uint16 bits (dtype '<u2'), fp32 as float32."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such checkpoint")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(1024), dtype="<i4")
        if head.size < 256 or head[0] != MODEL_MAGIC:
            raise DataError(f"{path} is not a model checkpoint (magic {head[0] if head.size else '?'}, expected {MODEL_MAGIC})")
        version, T, V, L, NH, C, Vp = (int(x) for x in head[1:8])
        if version == 10:
            raise DataError(f"{path} is a structured model (version 10): its BTT/Monarch/MoE layers have no "
                            f"Hugging Face GPT-2 equivalent; only dense GPT-2 checkpoints (versions 3 and 5) export")
        if version not in (3, 5):
            raise DataError(f"{path} has checkpoint version {version}; this script reads 3 (fp32) and 5 (bf16)")
        if min(T, V, L, NH, C, Vp) <= 0 or C % NH or Vp < V:
            raise DataError(f"{path}: header T {T} V {V} L {L} heads {NH} C {C} Vp {Vp} is not a GPT-2")
        shapes = [("wte", (Vp, C)), ("wpe", (T, C)), ("ln1w", (L, C)), ("ln1b", (L, C)),
                  ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)),
                  ("ln2w", (L, C)), ("ln2b", (L, C)), ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
                  ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)), ("lnfw", (C,)), ("lnfb", (C,))]
        dtype = np.dtype("<f4") if version == 3 else np.dtype("<u2")
        n = sum(int(np.prod(s)) for _, s in shapes)
        if size != 1024 + n * dtype.itemsize:
            raise DataError(f"{path}: {size} bytes, but a GPT-2 of this header takes {1024 + n * dtype.itemsize} "
                            f"({'truncated' if size < 1024 + n * dtype.itemsize else 'trailing data'})")
        flat = np.frombuffer(f.read(), dtype=dtype)
    tensors, at = {}, 0
    for name, shape in shapes:
        k = int(np.prod(shape))
        tensors[name] = flat[at:at + k].reshape(shape)
        at += k
    return {"version": version, "T": T, "V": V, "L": L, "NH": NH, "C": C, "Vp": Vp}, tensors


def to_bf16_bits(a):
    """float32 -> bf16 bits, rounded to nearest even (as the trainers' float_to_bf16; NaN kept)."""
    u = np.ascontiguousarray(a, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    nan = np.isnan(a)
    return np.where(nan, (u >> 16).astype("<u2") | 0x40, rounded).astype("<u2")


def hf_tensors(h, t):
    """llm.c's tensors -> transformers' GPT-2 names, (in, out) linear weights, unpadded wte."""
    out = {"transformer.wte.weight": t["wte"][:h["V"]], "transformer.wpe.weight": t["wpe"],
           "transformer.ln_f.weight": t["lnfw"], "transformer.ln_f.bias": t["lnfb"]}
    for i in range(h["L"]):
        p = f"transformer.h.{i}."
        out[p + "ln_1.weight"], out[p + "ln_1.bias"] = t["ln1w"][i], t["ln1b"][i]
        out[p + "attn.c_attn.weight"], out[p + "attn.c_attn.bias"] = t["qkvw"][i].T, t["qkvb"][i]
        out[p + "attn.c_proj.weight"], out[p + "attn.c_proj.bias"] = t["attprojw"][i].T, t["attprojb"][i]
        out[p + "ln_2.weight"], out[p + "ln_2.bias"] = t["ln2w"][i], t["ln2b"][i]
        out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = t["fcw"][i].T, t["fcb"][i]
        out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = t["fcprojw"][i].T, t["fcprojb"][i]
    return out


def write_safetensors(path, tensors, dtype_name, metadata):
    """The safetensors layout: an 8-byte little-endian header length, the JSON header (name ->
    dtype, shape, [begin, end) byte offsets into the data), then the tensors' bytes, row-major."""
    header, chunks, at = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        b = np.ascontiguousarray(tensors[name]).tobytes()
        header[name] = {"dtype": dtype_name, "shape": list(tensors[name].shape), "data_offsets": [at, at + len(b)]}
        chunks.append(b)
        at += len(b)
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)  # the data starts 8-byte aligned
    _atomic_write(path, [struct.pack("<Q", len(js)), js] + chunks)


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
