"""A Hugging Face GPT-2 (transformers' GPT2LMHeadModel, safetensors) -> an llm.c checkpoint for -e.

    python scripts/import_hf.py gpt2 gpt2_124M.bin                 # download OpenAI's GPT-2 124M from the hub
    python scripts/import_hf.py gpt2-medium gpt2_350M.bin --dtype bfloat16
    python scripts/import_hf.py path/to/folder model.bin           # a local folder (config.json + model.safetensors)

SOURCE is a folder holding config.json and model.safetensors, or one of OpenAI's GPT-2 models on
the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl), whose two files are downloaded into
--cache (default data/hf/<name>/) first. The output is llm.c's version 3 (fp32; default) or, with
--dtype bfloat16, version 5 (rounded to nearest even, as the GPU trainer writes it): the files
llm.c's own scripts write as gpt2_124M.bin and gpt2_124M_bf16.bin, so `./train_gpt2 -e
gpt2_124M.bin` fine-tunes the pretrained model. The mapping is scripts/gpt2_hf.py's; the config
must be a GPT-2 as the trainers compute it (tanh GELU, LayerNorm epsilon 1e-5, tied output layer).
"""

import argparse
import json
import os
import sys

import numpy as np

from gpt2_hf import DataError, hf_shapes, llmc_from_hf, padded_vocab, read_safetensors, write_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
from common import download, run_main  # noqa: E402

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(path):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the model config ({e})") from e
    act = cfg.get("activation_function", "gelu_new")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise DataError(f"{path}: model_type {cfg.get('model_type')!r}; only GPT-2 models import")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise DataError(f"{path}: activation_function {act!r}; the trainers compute GELU's tanh form (gelu_new)")
    if abs(eps - 1e-5) > 1e-12:
        raise DataError(f"{path}: layer_norm_epsilon {eps}; the trainers use 1e-5")
    if not cfg.get("tie_word_embeddings", True):
        raise DataError(f"{path}: an untied output layer (tie_word_embeddings false); the trainers tie it to wte")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise DataError(f"{path}: n_inner {cfg['n_inner']}; the trainers' MLP is 4 x n_embd")
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a folder with config.json and model.safetensors, or " + ", ".join(HUB_MODELS))
    ap.add_argument("out", help="the llm.c checkpoint to write")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="float32: version 3 (default); bfloat16: version 5")
    ap.add_argument("--cache", default=None, help="where hub downloads go (default data/hf/<name>/)")
    args = ap.parse_args()

    folder = args.source
    if not os.path.isdir(folder):
        if args.source not in HUB_MODELS:
            raise DataError(f"{args.source}: neither a folder nor one of {', '.join(HUB_MODELS)}")
        folder = args.cache or os.path.join(HERE, "..", "data", "hf", args.source)
        for f in ("config.json", "model.safetensors"):
            download(HUB_URL.format(name=args.source, file=f), os.path.join(folder, f),
                     hint="offline, download the model's config.json and model.safetensors elsewhere and pass their folder")
    cfg = load_config(os.path.join(folder, "config.json"))
    st = os.path.join(folder, "model.safetensors")
    raw = read_safetensors(st)
    # transformers saves "transformer.h.0..." (GPT2LMHeadModel) or "h.0..." (OpenAI's hub files);
    # the attention's causal-mask buffers are not weights
    hf = {}
    for k, v in raw.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue
        hf[k] = v
    h = {"T": cfg["n_positions"], "V": cfg["vocab_size"], "L": cfg["n_layer"], "NH": cfg["n_head"], "C": cfg["n_embd"]}
    h["Vp"] = padded_vocab(h["V"])
    if h["C"] % h["NH"]:
        raise DataError(f"{folder}/config.json: n_embd {h['C']} is not a multiple of n_head {h['NH']}")
    head = hf.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, hf.get("wte.weight")):
        raise DataError(f"{st}: lm_head.weight differs from wte.weight; the trainers tie the output layer to wte")
    want = hf_shapes(h)
    for k, shape in want.items():
        if k not in hf:
            raise DataError(f"{st}: no tensor {k} (a GPT-2 of config.json's L {h['L']}, C {h['C']} needs it)")
        if tuple(hf[k].shape) != shape:
            raise DataError(f"{st}: {k} has shape {tuple(hf[k].shape)}, config.json implies {shape}")
    extra = sorted(set(hf) - set(want))
    if extra:
        raise DataError(f"{st}: tensors a GPT-2 of this config does not have: {', '.join(extra[:5])}")
    version = 3 if args.dtype == "float32" else 5
    write_checkpoint(args.out, h, llmc_from_hf(h, hf), version)
    print(f"wrote {args.out}: version {version}, GPT-2 L {h['L']} heads {h['NH']} C {h['C']} V {h['V']} (padded {h['Vp']}) "
          f"T {h['T']}")


if __name__ == "__main__":
    sys.exit(run_main(main))
