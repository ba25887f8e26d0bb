"""scripts/export_hf.py and scripts/import_hf.py: llm.c-format checkpoints <-> Hugging Face GPT-2.

The expected tensors are built here from the checkpoint's arrays by transformers' GPT-2
conventions (Conv1D weights (in, out), wte without the padding rows); model.safetensors is parsed
here from its documented layout. An export imported back must give the same checkpoint bytes,
also from the hub's key layout. Loading the folders in transformers and comparing the loss with
the trainer's is dev/check_export_hf.py's job (it needs PyTorch, which CI does not install).
"""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "export_hf.py")
IMPORT = os.path.join(REPO_ROOT, "scripts", "import_hf.py")
T, V, VP, L, NH, C = 16, 100, 128, 2, 2, 8


def params(seed=0):
    """llm.c's tensors of the tiny model, in file order, as float32."""
    rng = np.random.default_rng(seed)
    shapes = [("wte", (VP, C)), ("wpe", (T, C)), ("ln1w", (L, C)), ("ln1b", (L, C)), ("qkvw", (L, 3 * C, C)),
              ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)), ("ln2w", (L, C)), ("ln2b", (L, C)),
              ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)), ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
              ("lnfw", (C,)), ("lnfb", (C,))]
    p = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}
    p["wte"][0, :3] = [1 + 2**-8, 1 + 3 * 2**-8, -2.0]  # bf16 ties: to 1 (even) and to 1 + 2^-6; exact
    return p


def write_ckpt(path, p, version=3, vocab=V, vp=VP):
    header = np.zeros(256, dtype="<i4")
    header[:8] = [20240326, version, T, vocab, L, NH, C, vp]
    flat = np.concatenate([a.ravel() for a in p.values()])
    body = flat.astype("<f4").tobytes() if version != 5 else (flat.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    with open(path, "wb") as f:
        f.write(header.tobytes() + body)


def export(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def import_hf(*args):
    return subprocess.run([sys.executable, IMPORT, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def write_safetensors(path, tensors):
    """float32 tensors, written here from the format's description (independent of gpt2_hf.py)."""
    header, blobs, at = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in tensors.items():
        b = np.ascontiguousarray(v, dtype="<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    js = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    out, end = {}, 0
    for name, h in header.items():
        b, e = h["data_offsets"]
        dt = {"F32": "<f4", "BF16": "<u2"}[h["dtype"]]
        out[name] = np.frombuffer(data[b:e], dtype=dt).reshape(h["shape"])
        end = max(end, e)
    assert end == len(data), "bytes after the last tensor"
    return out, meta


def expected(p):
    e = {"transformer.wte.weight": p["wte"][:V], "transformer.wpe.weight": p["wpe"],
         "transformer.ln_f.weight": p["lnfw"], "transformer.ln_f.bias": p["lnfb"]}
    for i in range(L):
        h = f"transformer.h.{i}."
        e.update({h + "ln_1.weight": p["ln1w"][i], h + "ln_1.bias": p["ln1b"][i],
                  h + "attn.c_attn.weight": p["qkvw"][i].T, h + "attn.c_attn.bias": p["qkvb"][i],
                  h + "attn.c_proj.weight": p["attprojw"][i].T, h + "attn.c_proj.bias": p["attprojb"][i],
                  h + "ln_2.weight": p["ln2w"][i], h + "ln_2.bias": p["ln2b"][i],
                  h + "mlp.c_fc.weight": p["fcw"][i].T, h + "mlp.c_fc.bias": p["fcb"][i],
                  h + "mlp.c_proj.weight": p["fcprojw"][i].T, h + "mlp.c_proj.bias": p["fcprojb"][i]})
    return e


def test_fp32_layout_and_config(tmp_path):
    p = params()
    write_ckpt(tmp_path / "m.bin", p)
    r = export(tmp_path / "m.bin", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    got, meta = read_safetensors(tmp_path / "hf" / "model.safetensors")
    want = expected(p)
    assert sorted(got) == sorted(want) and meta.get("format") == "pt"
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        assert np.array_equal(got[k], want[k]), k
    assert got["transformer.h.1.mlp.c_fc.weight"].shape == (C, 4 * C)  # Conv1D: (in, out)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["model_type"], cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"]) == \
        ("gpt2", V, T, C, L, NH)
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5 and cfg["tie_word_embeddings"]
    assert "no tokenizer written" in r.stdout and not (tmp_path / "hf" / "vocab.json").exists()


def test_bf16_rounding_and_bits(tmp_path):
    p = params()
    write_ckpt(tmp_path / "m3.bin", p)
    assert export(tmp_path / "m3.bin", tmp_path / "a", "--dtype", "bfloat16").returncode == 0
    got, _ = read_safetensors(tmp_path / "a" / "model.safetensors")
    wte = got["transformer.wte.weight"]
    assert wte.dtype == np.uint16 and list(wte[0, :3]) == [0x3F80, 0x3F82, 0xC000]
    for k, w in expected(p).items():  # every value within half a bf16 step (at most 2^-8 relative)
        back = (got[k].astype("<u4") << 16).view("<f4")
        assert np.all(np.abs(back - w) <= np.abs(w) * 2.0**-8), k
    # a bf16 checkpoint (version 5) keeps its bits; as float32 they widen exactly
    write_ckpt(tmp_path / "m5.bin", p, version=5)
    assert export(tmp_path / "m5.bin", tmp_path / "b").returncode == 0
    assert export(tmp_path / "m5.bin", tmp_path / "c", "--dtype", "float32").returncode == 0
    b5, _ = read_safetensors(tmp_path / "b" / "model.safetensors")
    c5, _ = read_safetensors(tmp_path / "c" / "model.safetensors")
    trunc = {k: (np.ascontiguousarray(w).view("<u4") >> 16).astype("<u2") for k, w in expected(p).items()}
    for k in trunc:
        assert np.array_equal(b5[k], trunc[k]), k
        assert np.array_equal(c5[k], (trunc[k].astype("<u4") << 16).view("<f4")), k
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_gpt2_vocab_copies_the_tokenizer(tmp_path):
    shared = os.path.abspath(os.environ.get("SHARED_DATA") or os.path.join(REPO_ROOT, "..", "shared", "data"))
    gpt2 = os.path.join(shared, "gpt2")
    if not os.path.isfile(os.path.join(gpt2, "encoder.json")):
        pytest.skip(f"no GPT-2 encoder.json in {gpt2}")
    p = params()
    p["wte"] = np.zeros((50304, C), dtype=np.float32)
    write_ckpt(tmp_path / "m.bin", p, vocab=50257, vp=50304)
    r = export(tmp_path / "m.bin", tmp_path / "hf", "--tokenizer_dir", gpt2)
    assert r.returncode == 0, r.stderr
    hf = tmp_path / "hf"
    assert (hf / "vocab.json").read_bytes() == open(os.path.join(gpt2, "encoder.json"), "rb").read()
    assert (hf / "merges.txt").read_bytes() == open(os.path.join(gpt2, "vocab.bpe"), "rb").read()
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["vocab_size"] == 50257 and cfg["eos_token_id"] == 50256
    assert read_safetensors(hf / "model.safetensors")[0]["transformer.wte.weight"].shape == (50257, C)
    r = export(tmp_path / "m.bin", tmp_path / "hf2", "--tokenizer_dir", tmp_path)
    assert r.returncode == 1 and "no encoder.json there" in r.stderr


def test_bad_inputs(tmp_path):
    p = params()
    write_ckpt(tmp_path / "s.bin", p, version=10)
    r = export(tmp_path / "s.bin", tmp_path / "o")
    assert r.returncode == 1 and "structured model (version 10)" in r.stderr
    write_ckpt(tmp_path / "m.bin", p)
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-4])
    r = export(tmp_path / "t.bin", tmp_path / "o")
    assert r.returncode == 1 and "truncated" in r.stderr and str(tmp_path / "t.bin") in r.stderr
    (tmp_path / "x.bin").write_bytes(b"\0" * 2048)
    r = export(tmp_path / "x.bin", tmp_path / "o")
    assert r.returncode == 1 and "is not a model checkpoint" in r.stderr
    r = export(tmp_path / "none.bin", tmp_path / "o")
    assert r.returncode == 1 and "no such checkpoint" in r.stderr
    assert not (tmp_path / "o").exists()


def exported(tmp_path, vocab_pad_zero=True):
    """A tiny v3 checkpoint (padding rows zero, as an import writes them) and its fp32 export."""
    p = params()
    if vocab_pad_zero:
        p["wte"][V:] = 0.0
    write_ckpt(tmp_path / "m.bin", p)
    assert export(tmp_path / "m.bin", tmp_path / "hf").returncode == 0
    return p


def test_import_round_trip(tmp_path):
    exported(tmp_path)
    r = import_hf(tmp_path / "hf", tmp_path / "back.bin")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()
    # the hub's layout: no "transformer." prefix, the causal-mask buffers, a tied lm_head
    t, _ = read_safetensors(tmp_path / "hf" / "model.safetensors")
    hub = {k.replace("transformer.", ""): v for k, v in t.items()}
    for i in range(L):
        hub[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, T, T), dtype=np.float32))
    hub["lm_head.weight"] = hub["wte.weight"]
    os.makedirs(tmp_path / "hub")
    write_safetensors(tmp_path / "hub" / "model.safetensors", hub)
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    r = import_hf(tmp_path / "hub", tmp_path / "back2.bin")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back2.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()


def test_import_bf16(tmp_path):
    p = exported(tmp_path)
    r = import_hf(tmp_path / "hf", tmp_path / "b.bin", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    raw = (tmp_path / "b.bin").read_bytes()
    assert list(np.frombuffer(raw[:32], dtype="<i4")) == [20240326, 5, T, V, L, NH, C, VP]
    bits = np.frombuffer(raw[1024:], dtype="<u2")
    assert list(bits[:3]) == [0x3F80, 0x3F82, 0xC000]  # the ties of params(), to even
    flat = np.concatenate([a.ravel() for a in p.values()])
    back = (bits.astype("<u4") << 16).view("<f4")
    assert back.size == flat.size and np.all(np.abs(back - flat) <= np.abs(flat) * 2.0**-8)


def test_import_bad_inputs(tmp_path):
    exported(tmp_path)
    hf = tmp_path / "hf"
    cfg = json.loads((hf / "config.json").read_text())
    t, _ = read_safetensors(hf / "model.safetensors")

    def variant(name, tensors=None, **cfg_changes):
        d = tmp_path / name
        os.makedirs(d)
        write_safetensors(d / "model.safetensors", t if tensors is None else tensors)
        (d / "config.json").write_text(json.dumps({**cfg, **cfg_changes}))
        return import_hf(d, tmp_path / (name + ".bin"))

    r = variant("relu", activation_function="relu")
    assert r.returncode == 1 and "activation_function 'relu'" in r.stderr
    r = variant("untied", {**t, "lm_head.weight": t["transformer.wte.weight"] + 1})
    assert r.returncode == 1 and "lm_head.weight differs from wte.weight" in r.stderr
    r = variant("missing", {k: v for k, v in t.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    assert r.returncode == 1 and "no tensor h.1.mlp.c_fc.bias" in r.stderr
    r = variant("deeper", n_layer=L + 1)
    assert r.returncode == 1 and "no tensor h.2.ln_1.weight" in r.stderr
    r = variant("wider", n_embd=2 * C, n_head=NH)
    assert r.returncode == 1 and "has shape" in r.stderr
    r = variant("notgpt2", model_type="llama")
    assert r.returncode == 1 and "only GPT-2 models import" in r.stderr
    r = import_hf(tmp_path / "nowhere", tmp_path / "x.bin")
    assert r.returncode == 1 and "neither a folder nor one of gpt2" in r.stderr
    assert not any(f.endswith(".bin") and f != "m.bin" for f in os.listdir(tmp_path))
