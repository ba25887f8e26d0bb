"""GPT-2 weights between llm.c's checkpoint format and Hugging Face's (transformers' GPT2LMHeadModel,
safetensors), for scripts/export_hf.py and scripts/import_hf.py.

Checkpoint: 256 int32 header (magic 20240326; version 3 = fp32 or 5 = bf16; max T, vocab V, layers
L, heads, channels C, padded vocab Vp), then wte (Vp, C), wpe (T, C), and per layer, each as one
(L, ...) block: ln1 w/b, qkv w (3C, C)/b, attention proj w (C, C)/b, ln2 w/b, fc w (4C, C)/b, fc
proj w (C, 4C)/b; then the final LayerNorm w/b. Structured models (version 10) have no GPT-2
equivalent.

Mapping: transformers' GPT-2 keeps its linear weights as Conv1D, (in, out), so each of ours (out,
in) is transposed; wte has V rows there and Vp here (the padding rows are zero when imported);
the output layer is wte (tied) on both sides. GELU is the tanh form (gelu_new) and LayerNorm's
epsilon 1e-5, as in llm.c.
"""

import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
from common import DataError, _atomic_write  # noqa: E402,F401  (the scripts take these from here)

MODEL_MAGIC = 20240326
GPT2_VOCAB = 50257


def llmc_shapes(h):
    """llm.c's tensors in file order, with their shapes, for a header dict."""
    T, V, L, C, Vp = h["T"], h["V"], h["L"], h["C"], h["Vp"]
    return [("wte", (Vp, C)), ("wpe", (T, C)), ("ln1w", (L, C)), ("ln1b", (L, C)),
            ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)),
            ("ln2w", (L, C)), ("ln2b", (L, C)), ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
            ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)), ("lnfw", (C,)), ("lnfb", (C,))]


def padded_vocab(V):
    """The trainers' Vp: V rounded up to a multiple of 128."""
    return (V + 127) // 128 * 128


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
        h = {"version": version, "T": T, "V": V, "L": L, "NH": NH, "C": C, "Vp": Vp}
        shapes = llmc_shapes(h)
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
    return h, tensors


def write_checkpoint(path, h, tensors, version):
    """llm.c's checkpoint from float32 tensors: version 3 (fp32) or 5 (bf16, nearest even)."""
    header = np.zeros(256, dtype="<i4")
    header[:8] = [MODEL_MAGIC, version, h["T"], h["V"], h["L"], h["NH"], h["C"], h["Vp"]]
    chunks = [header.tobytes()]
    for name, shape in llmc_shapes(h):
        a = np.asarray(tensors[name], dtype="<f4")
        assert a.shape == shape, (name, a.shape, shape)
        chunks.append((a if version == 3 else to_bf16_bits(a)).tobytes())
    _atomic_write(path, chunks)


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


def hf_shapes(h):
    """{name without "transformer.": shape} of every tensor transformers' GPT-2 of header h holds:
    hf_tensors applied to stand-ins of llm.c's shapes (broadcast views: no memory)."""
    stand_in = {name: np.broadcast_to(np.float32(0), shape) for name, shape in llmc_shapes(h)}
    return {k[len("transformer."):]: v.shape for k, v in hf_tensors(h, stand_in).items()}


def llmc_from_hf(h, hf):
    """transformers' GPT-2 tensors (float32, names without the "transformer." prefix) -> llm.c's,
    wte padded with zero rows to Vp."""
    L = h["L"]
    wte = np.zeros((h["Vp"], h["C"]), dtype="<f4")
    wte[:h["V"]] = hf["wte.weight"]
    per = lambda key, tr=False: np.stack([hf[f"h.{i}.{key}"].T if tr else hf[f"h.{i}.{key}"] for i in range(L)])
    return {"wte": wte, "wpe": hf["wpe.weight"], "ln1w": per("ln_1.weight"), "ln1b": per("ln_1.bias"),
            "qkvw": per("attn.c_attn.weight", True), "qkvb": per("attn.c_attn.bias"),
            "attprojw": per("attn.c_proj.weight", True), "attprojb": per("attn.c_proj.bias"),
            "ln2w": per("ln_2.weight"), "ln2b": per("ln_2.bias"), "fcw": per("mlp.c_fc.weight", True),
            "fcb": per("mlp.c_fc.bias"), "fcprojw": per("mlp.c_proj.weight", True), "fcprojb": per("mlp.c_proj.bias"),
            "lnfw": hf["ln_f.weight"], "lnfb": hf["ln_f.bias"]}


def read_safetensors(path):
    """{name: float32 array} of a .safetensors file (F32, F16 or BF16 tensors)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise DataError(f"{path} is not a safetensors file (truncated)")
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as e:
        raise DataError(f"{path} is not a safetensors file (header: {e})") from e
    header.pop("__metadata__", None)
    data, out = raw[8 + n:], {}
    for name, d in header.items():
        b, e = d["data_offsets"]
        if e > len(data):
            raise DataError(f"{path}: tensor {name} ends past the file (truncated)")
        buf = data[b:e]
        if d["dtype"] == "F32":
            a = np.frombuffer(buf, dtype="<f4")
        elif d["dtype"] == "F16":
            a = np.frombuffer(buf, dtype="<f2").astype("<f4")
        elif d["dtype"] == "BF16":
            a = (np.frombuffer(buf, dtype="<u2").astype("<u4") << 16).view("<f4")
        else:
            raise DataError(f"{path}: tensor {name} is {d['dtype']}; this script reads F32, F16 and BF16")
        out[name] = a.reshape(d["shape"])
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
