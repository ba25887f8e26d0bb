#!/usr/bin/env python3
"""
Reference GPT-2 (llm.c architecture) in float64 PyTorch, used to write the
test fixtures that the C trainer is compared against.

    python3 dev/reference.py --out dev/fixtures

Writes:
    dense_tiny.bin, dense_small.bin   model/training fixtures (format below)
    rng_normal.bin                    PyTorch CPU RNG (mt19937 + normal_/rand) fixture

See dev/fixtures/README.md for the byte-exact formats. Everything is computed
in float64 and cast to float32 only when written. Deterministic (fixed seeds).
"""
import argparse
import math
import os
import struct
import sys

import numpy as np
import torch

MODEL_MAGIC = 20241123
RNG_MAGIC = 20241124
VERSION = 1
DT = torch.float64

# parameter names in llm.c checkpoint order
PARAM_NAMES = ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
               "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"]
# tensors that get weight decay (the matrices)
DECAY_NAMES = {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}


def padded_vocab(V):
    return ((V + 127) // 128) * 128


def param_shapes(cfg):
    L, C, V, maxT = cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"], cfg["max_seq_len"]
    Vp = padded_vocab(V)
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


def config_text(cfg):
    return ("n_layer = %d\nn_head = %d\nn_embd = %d\nvocab_size = %d\nmax_seq_len = %d\n"
            % (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"], cfg["max_seq_len"]))


# ----------------------------------------------------------------------------
# initialisation

def init_params(cfg, gen):
    shapes = param_shapes(cfg)
    L, V = cfg["n_layer"], cfg["vocab_size"]

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=DT) * std + mean

    p = {}
    wte = torch.zeros(shapes["wte"], dtype=DT)
    wte[:V] = normal((V, shapes["wte"][1]), 0.02)  # padded rows stay exactly zero
    p["wte"] = wte
    p["wpe"] = normal(shapes["wpe"], 0.02)
    proj_std = 0.02 / math.sqrt(2 * L)
    for name in PARAM_NAMES[2:]:
        shp = shapes[name]
        if name in ("ln1w", "ln2w", "lnfw"):
            p[name] = normal(shp, 0.1, mean=1.0)
        elif name in ("attprojw", "fcprojw"):
            p[name] = normal(shp, proj_std)
        else:  # other matrices, biases, LN biases
            p[name] = normal(shp, 0.02)
    return p


# ----------------------------------------------------------------------------
# model

def layernorm(x, w, b, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dim=-1, keepdim=True)  # biased variance
    return xc / torch.sqrt(var + eps) * w + b


def gelu_tanh(u):
    return 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u * u * u)))


def forward(p, cfg, idx, targets):
    """Returns (logits over Vp columns (B,T,Vp), mean loss over the first V columns)."""
    L, NH, C, V = cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"]
    B, T = idx.shape
    hs = C // NH
    x = p["wte"][idx] + p["wpe"][:T].unsqueeze(0)          # (B,T,C)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(L):
        h = layernorm(x, p["ln1w"][l], p["ln1b"][l])
        qkv = h @ p["qkvw"][l].t() + p["qkvb"][l]           # (B,T,3C)
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        q = q.reshape(B, T, NH, hs).transpose(1, 2)         # (B,NH,T,hs)
        k = k.reshape(B, T, NH, hs).transpose(1, 2)
        v = v.reshape(B, T, NH, hs).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hs))
        att = att.masked_fill(~mask, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)      # merge heads
        x = x + (y @ p["attprojw"][l].t() + p["attprojb"][l])
        h = layernorm(x, p["ln2w"][l], p["ln2b"][l])
        u = gelu_tanh(h @ p["fcw"][l].t() + p["fcb"][l])
        x = x + (u @ p["fcprojw"][l].t() + p["fcprojb"][l])
    x = layernorm(x, p["lnfw"], p["lnfb"])
    logits = x @ p["wte"].t()                               # (B,T,Vp), tied head
    real = logits[..., :V]                                  # softmax over real vocab only
    logp = torch.log_softmax(real, dim=-1)
    loss = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()
    return logits, loss


def forward_functional(p, cfg, idx, targets):
    """Independent forward built from torch.nn.functional ops (self-check only)."""
    import torch.nn.functional as F
    L, NH, C, V = cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"]
    B, T = idx.shape
    x = F.embedding(idx, p["wte"]) + p["wpe"][:T]
    for l in range(L):
        h = F.layer_norm(x, (C,), p["ln1w"][l], p["ln1b"][l], eps=1e-5)
        q, k, v = F.linear(h, p["qkvw"][l], p["qkvb"][l]).split(C, dim=-1)
        q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), p["attprojw"][l], p["attprojb"][l])
        h = F.layer_norm(x, (C,), p["ln2w"][l], p["ln2b"][l], eps=1e-5)
        x = x + F.linear(F.gelu(F.linear(h, p["fcw"][l], p["fcb"][l]), approximate="tanh"),
                         p["fcprojw"][l], p["fcprojb"][l])
    logits = F.linear(F.layer_norm(x, (C,), p["lnfw"], p["lnfb"], eps=1e-5), p["wte"])
    loss = F.cross_entropy(logits[..., :V].reshape(-1, V), targets.reshape(-1))
    return logits, loss


def loss_and_grads(p, cfg, idx, targets):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    logits, loss = forward(leaves, cfg, idx, targets)
    gs = torch.autograd.grad(loss, [leaves[k] for k in PARAM_NAMES])
    return logits.detach(), loss.detach(), {k: g.detach() for k, g in zip(PARAM_NAMES, gs)}


def train(p0, cfg, idx, targets, hp, n_steps):
    p = {k: v.clone() for k, v in p0.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    vv = {k: torch.zeros_like(v) for k, v in p.items()}
    lr, b1, b2, eps, wd, clip = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], hp["grad_clip"]
    losses, norms = [], []
    for t in range(1, n_steps + 1):
        _, loss, g = loss_and_grads(p, cfg, idx, targets)
        norm = math.sqrt(sum(float((g[k] * g[k]).sum()) for k in PARAM_NAMES))
        losses.append(float(loss))
        norms.append(norm)
        scale = clip / norm if norm > clip else 1.0
        for k in PARAM_NAMES:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1.0 - b1) * gk
            vv[k] = b2 * vv[k] + (1.0 - b2) * gk * gk
            mhat = m[k] / (1.0 - b1 ** t)
            vhat = vv[k] / (1.0 - b2 ** t)
            wdp = wd if k in DECAY_NAMES else 0.0
            p[k] = p[k] - lr * (mhat / (torch.sqrt(vhat) + eps) + wdp * p[k])
    return p, losses, norms


# ----------------------------------------------------------------------------
# self-checks

def finite_difference_check(p, cfg, idx, targets, grads, gen, h=1e-5):
    """Central differences (float64) vs. autograd on one random entry of every parameter
    tensor plus a few extra real wte rows. Returns the worst error, measured as
    |fd - ad| / max(|ad|, 1e-4) (relative for ordinary gradients, absolute for tiny ones)."""
    V, C = cfg["vocab_size"], cfg["n_embd"]
    picks = [(n, int(torch.randint(p[n].numel(), (1,), generator=gen))) for n in PARAM_NAMES if n != "wte"]
    picks += [("wte", int(torch.randint(V * C, (1,), generator=gen))) for _ in range(3)]
    worst = 0.0
    for name, j in picks:
        flat = p[name].view(-1)
        orig = flat[j].item()
        flat[j] = orig + h
        _, lp = forward(p, cfg, idx, targets)
        flat[j] = orig - h
        _, lm = forward(p, cfg, idx, targets)
        flat[j] = orig
        fd = (float(lp) - float(lm)) / (2 * h)
        ad = float(grads[name].view(-1)[j])
        err = abs(fd - ad) / max(abs(ad), 1e-4)
        worst = max(worst, err)
        print("    fd-check %-9s [%7d] autograd=% .10e  fd=% .10e  err=%.2e" % (name, j, ad, fd, err))
    return worst


# ----------------------------------------------------------------------------
# writers

def f32(t):
    return np.ascontiguousarray(t.detach().to(torch.float64).cpu().numpy().astype("<f4").reshape(-1))


def flat_params(p):
    return np.concatenate([f32(p[k]) for k in PARAM_NAMES])


def make_model_fixture(path, name, cfg, B, T, n_steps, hp, seed):
    print("=== %s: L=%d NH=%d C=%d V=%d maxT=%d B=%d T=%d steps=%d" % (
        name, cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"], cfg["max_seq_len"], B, T, n_steps))
    print("    hyper: " + ", ".join("%s=%g" % kv for kv in hp.items()))
    gen = torch.Generator().manual_seed(seed)
    V, Vp = cfg["vocab_size"], padded_vocab(cfg["vocab_size"])
    p0 = init_params(cfg, gen)
    idx = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)

    logits, loss, grads = loss_and_grads(p0, cfg, idx, targets)
    print("    step-0 loss = %.10f   (ln V = %.6f)" % (float(loss), math.log(V)))

    # self-checks
    flogits, floss = forward_functional(p0, cfg, idx, targets)
    dl = float((flogits - logits).abs().max())
    print("    cross-check vs torch.nn.functional forward: max|dlogits| = %.2e, |dloss| = %.2e"
          % (dl, abs(float(floss) - float(loss))))
    assert dl < 1e-10 and abs(float(floss) - float(loss)) < 1e-10
    pad_grad_max = float(grads["wte"][V:].abs().max()) if Vp > V else 0.0
    print("    padded wte rows grad max |g| = %g  -> %s" % (pad_grad_max, "OK" if pad_grad_max == 0.0 else "FAIL"))
    assert pad_grad_max == 0.0
    worst = finite_difference_check({k: v.clone() for k, v in p0.items()}, cfg, idx, targets, grads, gen)
    print("    finite-difference worst rel err = %.3e -> %s" % (worst, "OK" if worst < 1e-5 else "FAIL"))
    assert worst < 1e-5

    pf, losses, norms = train(p0, cfg, idx, targets, hp, n_steps)
    assert abs(losses[0] - float(loss)) < 1e-12
    nclip = 0
    for t, (l, n) in enumerate(zip(losses, norms), 1):
        clipped = n > hp["grad_clip"]
        nclip += clipped
        print("    step %2d  loss %.8f  grad_norm %.8f%s" % (t, l, n, "  (clipped)" if clipped else ""))
    print("    loss fell %.6f -> %.6f; clipping active on %d/%d steps" % (losses[0], losses[-1], nclip, n_steps))
    assert losses[-1] < losses[0]
    margin = min(abs(n - hp["grad_clip"]) / hp["grad_clip"] for n in norms)
    print("    nearest grad_norm is %.1f%% from grad_clip" % (100 * margin))
    assert margin > 0.01, "a grad norm is too close to grad_clip; float32 C code could branch differently"
    assert float(pf["wte"][V:].abs().max()) == 0.0 if Vp > V else True

    cfg_bytes = config_text(cfg).encode("ascii")
    flat0 = flat_params(p0)
    num_params = flat0.size
    assert num_params == sum(math.prod(s) for s in param_shapes(cfg).values())
    header = np.zeros(256, dtype="<i4")
    header[:9] = [MODEL_MAGIC, VERSION, B, T, n_steps, len(cfg_bytes), num_params, V, Vp]
    hyper = np.zeros(64, dtype="<f4")
    hyper[:6] = [hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], hp["grad_clip"]]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(hyper.tobytes())
        f.write(cfg_bytes)
        f.write(flat0.tobytes())
        f.write(idx.numpy().astype("<i4").tobytes())
        f.write(targets.numpy().astype("<i4").tobytes())
        f.write(f32(logits[..., :V]).tobytes())
        f.write(np.array([float(loss)], dtype="<f4").tobytes())
        f.write(flat_params(grads).tobytes())
        f.write(np.array(losses, dtype="<f4").tobytes())
        f.write(np.array(norms, dtype="<f4").tobytes())
        f.write(flat_params(pf).tobytes())
    print("    wrote %s (%d bytes)" % (path, os.path.getsize(path)))
    assert os.path.getsize(path) < 3 * 1024 * 1024, "fixture over the 3 MB budget"
    return dict(p0=flat0, idx=idx, targets=targets, logits=f32(logits[..., :V]), loss=float(loss),
                grads=flat_params(grads), losses=losses, norms=norms, pf=flat_params(pf), cfg_text=config_text(cfg))


RNG_CASES = [
    # (seed, kind, n, mean, std); seed -1 = continue the previous generator
    (42, 0, 16, 0.0, 1.0),
    (42, 0, 17, 0.0, 1.0),
    (42, 0, 100, 0.0, 0.02),
    (42, 0, 1000, 0.0, 0.02),
    (1337, 0, 4096, 0.0, 1.0),
    (42, 0, 8, 0.0, 1.0),        # n < 16 path
    # sequence case: state carried across calls on the default generator
    (42, 0, 1000, 0.0, 0.02),
    (-1, 0, 333, 0.0, 0.02),
    (-1, 0, 5, 0.0, 1.0),
    (-1, 1, 7, 0.0, 0.0),        # torch.rand (uniform [0,1) float32); mean/std unused
]


def make_rng_fixture(path):
    print("=== rng_normal")
    recs = []
    for seed, kind, n, mean, std in RNG_CASES:
        if seed >= 0:
            torch.manual_seed(seed)
        if kind == 0:
            t = torch.empty(n, dtype=torch.float32).normal_(mean=mean, std=std)
        else:
            t = torch.rand(n, dtype=torch.float32)
        vals = t.numpy().astype("<f4")
        recs.append((seed, kind, n, mean, std, vals))
        print("    seed %5d kind %d n %5d std %-5g first: %s" % (seed, kind, n, std, " ".join("%.7g" % x for x in vals[:4])))
    header = np.zeros(256, dtype="<i4")
    header[:3] = [RNG_MAGIC, VERSION, len(recs)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for seed, kind, n, mean, std, vals in recs:
            f.write(struct.pack("<iiiff", seed, kind, n, mean, std))
            f.write(vals.tobytes())
    print("    wrote %s (%d bytes)" % (path, os.path.getsize(path)))
    return recs


# ----------------------------------------------------------------------------
# independent numpy readers (verify the files parse back exactly)

def read_model_fixture(path):
    buf = open(path, "rb").read()
    off = 0

    def take(dtype, count):
        nonlocal off
        a = np.frombuffer(buf, dtype=dtype, count=count, offset=off)
        off += a.nbytes
        return a

    h = take("<i4", 256)
    assert h[0] == MODEL_MAGIC and h[1] == VERSION, "bad magic/version"
    B, T, n_steps, cfg_len, num_params, V, Vp = (int(x) for x in h[2:9])
    assert not h[9:].any()
    hyper = take("<f4", 64)
    assert not hyper[6:].any()
    cfg_text = buf[off:off + cfg_len].decode("ascii")
    off += cfg_len
    cfg = {}
    for line in cfg_text.splitlines():
        k, v = line.split(" = ")
        cfg[k] = int(v)
    assert cfg["vocab_size"] == V and padded_vocab(V) == Vp
    assert sum(math.prod(s) for s in param_shapes(cfg).values()) == num_params
    out = dict(B=B, T=T, n_steps=n_steps, V=V, Vp=Vp, hyper=hyper, cfg_text=cfg_text)
    out["p0"] = take("<f4", num_params)
    out["idx"] = take("<i4", B * T)
    out["targets"] = take("<i4", B * T)
    out["logits"] = take("<f4", B * T * V)
    out["loss"] = take("<f4", 1)[0]
    out["grads"] = take("<f4", num_params)
    out["losses"] = take("<f4", n_steps)
    out["norms"] = take("<f4", n_steps)
    out["pf"] = take("<f4", num_params)
    expected = 256 * 4 + 64 * 4 + cfg_len + 4 * (3 * num_params + 2 * B * T + B * T * V + 1 + 2 * n_steps)
    assert off == len(buf) == expected, "size mismatch: parsed %d, file %d, expected %d" % (off, len(buf), expected)
    return out


def read_rng_fixture(path):
    buf = open(path, "rb").read()
    h = np.frombuffer(buf, dtype="<i4", count=256)
    assert h[0] == RNG_MAGIC and h[1] == VERSION
    off = 1024
    recs = []
    for _ in range(int(h[2])):
        seed, kind, n, mean, std = struct.unpack_from("<iiiff", buf, off)
        off += 20
        vals = np.frombuffer(buf, dtype="<f4", count=n, offset=off)
        off += 4 * n
        recs.append((seed, kind, n, mean, std, vals))
    assert off == len(buf), "rng size mismatch"
    return recs


def verify_model(path, ref):
    r = read_model_fixture(path)
    assert r["cfg_text"] == ref["cfg_text"]
    for k in ("p0", "grads", "pf", "logits"):
        assert np.array_equal(r[k], ref[k]), k
    assert np.array_equal(r["idx"], ref["idx"].numpy().reshape(-1))
    assert np.array_equal(r["targets"], ref["targets"].numpy().reshape(-1))
    assert r["loss"] == np.float32(ref["loss"])
    assert np.array_equal(r["losses"], np.array(ref["losses"], dtype="<f4"))
    assert np.array_equal(r["norms"], np.array(ref["norms"], dtype="<f4"))
    C = int(r["cfg_text"].split("n_embd = ")[1].split("\n")[0])
    V, Vp = r["V"], r["Vp"]
    assert not r["p0"][V * C:Vp * C].any() and not r["grads"][V * C:Vp * C].any() and not r["pf"][V * C:Vp * C].any()
    print("    verified %s: %d bytes, num_params=%d, B=%d T=%d steps=%d" % (
        path, os.path.getsize(path), r["p0"].size, r["B"], r["T"], r["n_steps"]))


def verify_rng(path, ref):
    r = read_rng_fixture(path)
    assert len(r) == len(ref)
    for a, b in zip(r, ref):
        assert a[:3] == b[:3] and np.float32(a[3]) == np.float32(b[3]) and np.float32(a[4]) == np.float32(b[4])
        assert np.array_equal(a[5], b[5])
    print("    verified %s: %d bytes, %d records" % (path, os.path.getsize(path), len(r)))


# ----------------------------------------------------------------------------

def make_init_fixture(path, cfg, seed=42):
    """llm.c's random GPT-2 init, drawn with torch's own generator: one mt19937 stream from
    `seed`, float32 normal_ on wte (real rows only), wpe, then per layer qkvw, attprojw, fcw,
    fcprojw (std 0.02, residual projections 0.02/sqrt(2L)); LN weights 1, the rest 0.
    Format: int32 header[256] ([0]=20241126 magic, [1]=1, [2]=num_params, [3]=config_len),
    config text, float32 params in llm.c order."""
    L, C, V = cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]
    shapes = param_shapes(cfg)
    p = {k: torch.zeros(v, dtype=torch.float32) for k, v in shapes.items()}
    for k in ("ln1w", "ln2w", "lnfw"):
        p[k].fill_(1.0)
    torch.manual_seed(seed)
    p["wte"][:V] = torch.empty(V * C, dtype=torch.float32).normal_(0.0, 0.02).view(V, C)
    p["wpe"].copy_(torch.empty(p["wpe"].numel(), dtype=torch.float32).normal_(0.0, 0.02).view_as(p["wpe"]))
    resid = 0.02 / math.sqrt(2 * L)
    for l in range(L):
        for k, std in (("qkvw", 0.02), ("attprojw", resid), ("fcw", 0.02), ("fcprojw", resid)):
            n = p[k][l].numel()
            p[k][l] = torch.empty(n, dtype=torch.float32).normal_(0.0, std).view_as(p[k][l])
    flat = torch.cat([p[k].reshape(-1) for k in shapes]).numpy().astype("<f4")
    text = config_text(cfg).encode()
    header = np.zeros(256, dtype="<i4")
    header[:4] = [20241126, 1, flat.size, len(text)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(text)
        f.write(flat.tobytes())
    print("wrote %s (%d params)" % (path, flat.size))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    print("torch %s, numpy %s" % (torch.__version__, np.__version__))

    # dense_tiny: grad_clip=1.75 so that clipping is active on some steps (3,4,5) and
    #   inactive on the others (both code paths; nearest norm is 2.8% from the threshold).
    # dense_small: L=3, NH=6 (hs=8), C=48, V=1000 (Vp=1024), T=24 < maxT=48; grad_clip=0.2
    #   so clipping is active on every step. (C=96 would make the file 5.5 MB, over the
    #   3 MB budget for committed fixtures.)
    adam = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    fixtures = [
        ("dense_tiny",
         dict(n_layer=2, n_head=4, n_embd=64, vocab_size=500, max_seq_len=32),
         4, 16, 10, dict(lr=3e-3, **adam, grad_clip=1.75), 1234),
        ("dense_small",
         dict(n_layer=3, n_head=6, n_embd=48, vocab_size=1000, max_seq_len=48),
         2, 24, 10, dict(lr=3e-3, **adam, grad_clip=0.2), 5678),
    ]
    refs = {}
    for name, cfg, B, T, n_steps, hp, seed in fixtures:
        path = os.path.join(args.out, name + ".bin")
        refs[path] = make_model_fixture(path, name, cfg, B, T, n_steps, hp, seed)
    rng_path = os.path.join(args.out, "rng_normal.bin")
    rng_ref = make_rng_fixture(rng_path)
    make_init_fixture(os.path.join(args.out, "init_llmc.bin"),
                      dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, max_seq_len=16))

    print("=== read-back verification")
    for path, ref in refs.items():
        verify_model(path, ref)
    verify_rng(rng_path, rng_ref)
    print("all fixtures written and verified")


if __name__ == "__main__":
    sys.exit(main())
