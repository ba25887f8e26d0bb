#!/usr/bin/env python3
"""dev/bench/structured_torch.py: the PyTorch column of the structured-layer benchmark (issue 5).

The same layers as dev/cuda/structured_layers times, computed the way the papers' public PyTorch
code computes them: strided-batched matmuls with a transpose + contiguous copy between the two
stages, and a hand-written backward of the same kind.

  dense         y = x @ W.T (torch.nn.functional.linear, autograd)
  btt_rR        x.view(N, gamma, alpha) -> bmm with W0 over the gamma blocks -> transpose ->
                contiguous -> bmm with W1 over the phi blocks -> reshape (default factors)
  monarch_B     x.view(N, nb, p) -> bmm with R^T -> the (q, nb) -> (nb, q) transpose of each row ->
                contiguous -> bmm with L^T -> permute/reshape; 4 and ~sqrt(d) blocks
  btt_moe_8x2   router logits, top-2, softmax gates over the selected, scattered into an (N, 8)
                gate matrix that is zero for the other experts; then ALL 8 experts are computed
                as one rank-8 BTT and masked by the gates: by default the mask multiplies each
                expert's intermediate z before the second stage (as the BTT-MoE paper's code
                does), with --moe separate each expert's output is kept separately (a bmm over
                phi x 8 batches) and the outputs are weighted by the gates and summed. The router
                gradient flows through the gates; the aux loss is not computed (as in the CUDA
                program, daux = 0).

Shapes and layouts are the repository's (structured/btt.h, monarch.h, moe.h):
  BTT     W0 (gamma, alpha, phi*rho), W1 (phi, gamma*rho, eps); input index g*alpha + a, output
          index f*eps + e; rank component s of W0's last axis is f*rho + s, of W1's middle g*rho + s
  Monarch R (nb, q, p), L (nb, s, q), q = min(p, s); u[k*q + j] = sum_c R[k,j,c] x[k*p + c],
          y[i*nb + l] = sum_r L[l,i,r] u[r*nb + l]
  BTT-MoE a BTT of rank E whose rank component e is expert e; router (E, d_in)

Timing (CUDA, bf16): forward + backward (dx and every weight gradient, via torch.autograd.grad)
timed with torch.cuda.Event, mean of --reps runs after --warmup (with --device cpu: float32, the
best of --reps runs timed one by one, as dev/bench/layers_cpu.c times ours); prints

  RESULT d=768 din=768 dout=3072 struct=btt_r1 ms=... fwd_ms=...

with the struct names of dev/cuda/structured_layers, so that dev/bench/structured.sh can join
the two. A case that runs out of memory prints ms=nan note=oom. --device cpu is the PyTorch column
of dev/bench/torch_cpu.sh, the same comparison with the CPU trainer's layers.

--check: on the CPU in float64, at small sizes, compares the BTT / Monarch / BTT-MoE outputs and
every gradient with a dense matrix materialised from the cores by the index formulas above
(autograd through the materialisation gives the reference gradients): the baseline computes the
same function as the repository's layers. Needs only torch (CPU); exits 1 on a mismatch.

torch is not a requirement of the repository (requirements.txt): this script is only for the
benchmark machine.
"""
import argparse
import math
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # the benchmark script reports this and skips the PyTorch column
    print(f"structured_torch.py: PyTorch is not installed ({e}); pip install torch", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------------------
# shapes (structured/factor.h's default_factors, dev/cuda/structured_layers.cu's cases)

def default_factors(d):
    """The prime factors of d ascending, each multiplied into the smaller factor (the first on a
    tie), the pair sorted: 768 -> (16, 48), 1024 -> (32, 32), 3072 -> (32, 96)."""
    if d < 1:
        return 0, 0
    a, b, n, p = 1, 1, d, 2
    while p * p <= n:
        while n % p == 0:
            if a <= b:
                a *= p
            else:
                b *= p
            n //= p
        p += 1
    if n > 1:
        if a <= b:
            a *= n
        else:
            b *= n
    return (a, b) if a <= b else (b, a)


def monarch_sqrt_blocks(d, dout):
    """The largest divisor of d not above sqrt(d) that also divides dout."""
    best, b = 1, 1
    while b * b <= d:
        if d % b == 0 and dout % b == 0:
            best = b
        b += 1
    return best


def cases(din, dout):
    """(name, kind, params) in the CUDA program's order."""
    alpha, gamma = default_factors(din)
    phi, eps = default_factors(dout)
    out = [("dense", "dense", {})]
    for r in (1, 2, 4):
        out.append((f"btt_r{r}", "btt", dict(alpha=alpha, gamma=gamma, phi=phi, eps=eps, rank=r)))
    out.append(("monarch_4", "monarch", dict(nb=4)))
    out.append(("monarch_sqrt", "monarch", dict(nb=monarch_sqrt_blocks(din, dout))))
    out.append(("btt_moe_8x2", "moe", dict(alpha=alpha, gamma=gamma, phi=phi, eps=eps, experts=8, topk=2)))
    return out


# ------------------------------------------------------------------------------------------------
# BTT: two bmm's with a transpose + contiguous between them; hand-written backward of the same kind.
# gate (N, rho) or None: multiplies rank component s of z (BTT-MoE: zero for unselected experts).

class BTTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W0, W1, dims, gate):
        A, G, P, Ep, R = dims
        N = x.shape[0]
        xg = x.view(N, G, A).transpose(0, 1)                           # (G, N, A), strided view
        z1 = torch.bmm(xg, W0)                                         # (G, N, P*R)
        zt = z1.view(G, N, P, R).transpose(0, 2).contiguous()          # (P, N, G, R)
        zs = zt if gate is None else zt * gate.view(1, N, 1, R)
        y = torch.bmm(zs.view(P, N, G * R), W1)                        # (P, N, Ep)
        ctx.dims = dims
        ctx.save_for_backward(x, W0, W1, zt, gate)
        return y.transpose(0, 1).reshape(N, P * Ep)

    @staticmethod
    def backward(ctx, dy):
        x, W0, W1, zt, gate = ctx.saved_tensors
        A, G, P, Ep, R = ctx.dims
        N = x.shape[0]
        dyt = dy.reshape(N, P, Ep).transpose(0, 1)                     # (P, N, Ep), strided view
        zs = zt if gate is None else zt * gate.view(1, N, 1, R)
        dW1 = torch.bmm(zs.view(P, N, G * R).transpose(1, 2), dyt)     # (P, G*R, Ep)
        dz = torch.bmm(dyt, W1.transpose(1, 2)).view(P, N, G, R)       # d zs, (P, N, G, R)
        dgate = None
        if gate is not None:
            acc = torch.float32 if dz.dtype in (torch.bfloat16, torch.float16) else dz.dtype
            dgate = (dz * zt).sum(dim=(0, 2), dtype=acc).to(gate.dtype)  # (N, R)
            dz = dz * gate.view(1, N, 1, R)
        dz1 = dz.transpose(0, 2).contiguous().view(G, N, P * R)        # (G, N, P*R)
        dx = torch.bmm(dz1, W0.transpose(1, 2)).transpose(0, 1).reshape(N, G * A)
        dW0 = torch.bmm(x.view(N, G, A).transpose(0, 1).transpose(1, 2), dz1)  # (G, A, P*R)
        return dx, dW0, dW1, None, dgate


def btt(x, W0, W1, dims, gate=None):
    return BTTFunction.apply(x, W0, W1, dims, gate)


# ------------------------------------------------------------------------------------------------
# Monarch (block-diagonal R, the stride permutation, block-diagonal L), hand-written backward.

class MonarchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, L):
        nb, q, p = R.shape
        s = L.shape[1]
        N = x.shape[0]
        xk = x.view(N, nb, p).transpose(0, 1)                                  # (nb, N, p)
        u1 = torch.bmm(xk, R.transpose(1, 2))                                  # (nb, N, q): u[k*q + j]
        ut = u1.transpose(0, 1).reshape(N, q, nb).transpose(1, 2).contiguous().transpose(0, 1)  # (nb, N, q): u[r*nb + l]
        y2 = torch.bmm(ut, L.transpose(1, 2))                                  # (nb, N, s)
        ctx.save_for_backward(x, R, L, ut)
        return y2.permute(1, 2, 0).reshape(N, s * nb)                          # y[i*nb + l]

    @staticmethod
    def backward(ctx, dy):
        x, R, L, ut = ctx.saved_tensors
        nb, q, p = R.shape
        s = L.shape[1]
        N = x.shape[0]
        dyt = dy.reshape(N, s, nb).transpose(1, 2).contiguous().transpose(0, 1)  # (nb, N, s)
        dL = torch.bmm(dyt.transpose(1, 2), ut)                                   # (nb, s, q)
        dut = torch.bmm(dyt, L)                                                   # (nb, N, q)
        du1 = dut.transpose(0, 1).transpose(1, 2).contiguous().reshape(N, nb, q).transpose(0, 1)  # (nb, N, q)
        dx = torch.bmm(du1, R).transpose(0, 1).reshape(N, nb * p)
        dR = torch.bmm(du1.transpose(1, 2), x.view(N, nb, p).transpose(0, 1))    # (nb, q, p)
        return dx, dR, dL


def monarch(x, R, L):
    return MonarchFunction.apply(x, R, L)


# ------------------------------------------------------------------------------------------------
# BTT-MoE: all experts, then the mask

def moe_gates(x, router, topk):
    """(N, E) gates: softmax over the top-k logits (in fp32 for bf16 inputs), zero for the other experts."""
    logits = x @ router.t()
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    vals, idx = torch.topk(logits, topk, dim=-1)
    g = torch.softmax(vals, dim=-1).to(x.dtype)
    return torch.zeros_like(logits, dtype=x.dtype).scatter(1, idx, g), idx


def moe(x, W0, W1, router, dims, topk, variant="mask_z"):
    A, G, P, Ep, E = dims
    N = x.shape[0]
    gate, _ = moe_gates(x, router, topk)
    if variant == "mask_z":
        return btt(x, W0, W1, dims, gate)
    # every expert's output separately: z (P, E, N, G) . W1_e (P, E, G, Ep) -> (P, E, N, Ep)
    xg = x.view(N, G, A).transpose(0, 1)
    z1 = torch.bmm(xg, W0)                                                     # (G, N, P*E)
    z = z1.view(G, N, P, E).permute(2, 3, 1, 0).contiguous().view(P * E, N, G)
    w1 = W1.view(P, G, E, Ep).permute(0, 2, 1, 3).reshape(P * E, G, Ep)
    ye = torch.bmm(z, w1).view(P, E, N, Ep)
    y = (ye * gate.t().reshape(1, E, N, 1)).sum(dim=1)                         # (P, N, Ep)
    return y.transpose(0, 1).reshape(N, P * Ep)


# ------------------------------------------------------------------------------------------------
# dense materialisations (the --check reference), straight from the index formulas

def btt_dense(W0, W1, dims):
    """W (d_out, d_in): W[f*eps + e, g*alpha + a] = sum_s W0[g, a, f*rho + s] W1[f, g*rho + s, e]."""
    A, G, P, Ep, R = dims
    w0 = W0.reshape(G, A, P, R)
    w1 = W1.reshape(P, G, R, Ep)
    return torch.einsum("gafs,fgse->fega", w0, w1).reshape(P * Ep, G * A)


def btt_expert_dense(W0, W1, dims, e):
    """Expert e of a rank-E BTT: the rank-1 BTT of rank component e."""
    A, G, P, Ep, E = dims
    w0 = W0.reshape(G, A, P, E)[..., e]
    w1 = W1.reshape(P, G, E, Ep)[:, :, e, :]
    return torch.einsum("gaf,fge->fega", w0, w1).reshape(P * Ep, G * A)


def monarch_dense(R, L):
    """W (d_out, d_in): W[i*nb + l, k*p + c] = sum_r L[l, i, r] R[k, j, c] with k*q + j = r*nb + l."""
    nb, q, p = R.shape
    s = L.shape[1]
    rows = []
    for l in range(nb):
        blk = torch.zeros(s, nb * p, dtype=R.dtype)
        for r in range(q):
            k, j = divmod(r * nb + l, q)
            col = torch.zeros(nb * p, dtype=R.dtype)
            col = col.index_put((torch.arange(k * p, (k + 1) * p),), R[k, j, :])
            blk = blk + L[l, :, r].unsqueeze(1) * col.unsqueeze(0)
        rows.append(blk)
    W = torch.stack(rows, dim=1)               # (s, nb, d_in): row i*nb + l
    return W.reshape(s * nb, nb * p)


def run_check():
    torch.manual_seed(0)
    dt = torch.float64
    fails = 0
    for d, want in ((768, (16, 48)), (1024, (32, 32)), (3072, (32, 96)), (512, (16, 32)), (13, (1, 13))):
        got = default_factors(d)
        if got != want:
            print(f"FAIL default_factors({d}) = {got}, structured/factor.h says {want}")
            fails += 1
    for d, dout, want in ((768, 3072, 24), (1024, 4096, 32), (2048, 8192, 32), (4096, 16384, 64)):
        if monarch_sqrt_blocks(d, dout) != want:
            print(f"FAIL monarch_sqrt_blocks({d}, {dout}) = {monarch_sqrt_blocks(d, dout)}, expected {want}")
            fails += 1

    def compare(what, got, ref):
        nonlocal fails
        err = (got - ref).abs().max().item()
        scale = ref.abs().max().item()
        rel = err / scale if scale > 0 else err
        ok = rel < 1e-10
        fails += not ok
        return rel, ok

    def report(name, results):
        worst = max(r for r, _ in results.values())
        ok = all(o for _, o in results.values())
        detail = " ".join(f"{k} {r:.1e}" for k, (r, _) in results.items())
        print(f"{'ok  ' if ok else 'FAIL'} {name:38s} max rel err {worst:.2e}  ({detail})")

    N = 37
    for din, dout in ((24, 96), (96, 24), (12, 20), (16, 64)):
        x0 = torch.randn(N, din, dtype=dt)
        dy = torch.randn(N, dout, dtype=dt)
        alpha, gamma = default_factors(din)
        phi, eps = default_factors(dout)
        for rank in (1, 2, 4):
            dims = (alpha, gamma, phi, eps, rank)
            W0 = torch.randn(gamma, alpha, phi * rank, dtype=dt, requires_grad=True)
            W1 = torch.randn(phi, gamma * rank, eps, dtype=dt, requires_grad=True)
            x = x0.clone().requires_grad_(True)
            y = btt(x, W0, W1, dims)
            g = torch.autograd.grad(y, (x, W0, W1), dy)
            yr = x @ btt_dense(W0, W1, dims).t()
            gr = torch.autograd.grad(yr, (x, W0, W1), dy)
            res = {"y": compare("y", y, yr)}
            for k, a, b in zip(("dx", "dW0", "dW1"), g, gr):
                res[k] = compare(k, a, b)
            report(f"btt {din}->{dout} {alpha}x{gamma}>{phi}x{eps} r{rank}", res)
        for nb in sorted({b for b in (1, 2, 4, monarch_sqrt_blocks(din, dout)) if din % b == 0 and dout % b == 0}):
            p, s = din // nb, dout // nb
            q = min(p, s)
            R = torch.randn(nb, q, p, dtype=dt, requires_grad=True)
            L = torch.randn(nb, s, q, dtype=dt, requires_grad=True)
            x = x0.clone().requires_grad_(True)
            y = monarch(x, R, L)
            g = torch.autograd.grad(y, (x, R, L), dy)
            yr = x @ monarch_dense(R, L).t()
            gr = torch.autograd.grad(yr, (x, R, L), dy)
            res = {"y": compare("y", y, yr)}
            for k, a, b in zip(("dx", "dR", "dL"), g, gr):
                res[k] = compare(k, a, b)
            report(f"monarch {din}->{dout} {nb} blocks (p {p} s {s} q {q})", res)
        for E, K in ((8, 2), (4, 1), (3, 3)):
            dims = (alpha, gamma, phi, eps, E)
            W0 = torch.randn(gamma, alpha, phi * E, dtype=dt, requires_grad=True)
            W1 = torch.randn(phi, gamma * E, eps, dtype=dt, requires_grad=True)
            Rt = torch.randn(E, din, dtype=dt, requires_grad=True)
            for variant in ("mask_z", "separate"):
                x = x0.clone().requires_grad_(True)
                y = moe(x, W0, W1, Rt, dims, K, variant)
                g = torch.autograd.grad(y, (x, W0, W1, Rt), dy)
                # reference: the selected experts' dense matrices, gates from the same routing
                # formula (logits = R x, top-k, softmax over the selected)
                logits = x @ Rt.t()
                vals, idx = torch.topk(logits, K, dim=-1)
                gates = torch.softmax(vals, dim=-1)
                Wd = torch.stack([btt_expert_dense(W0, W1, dims, e) for e in range(E)])   # (E, d_out, d_in)
                ye = torch.einsum("eoi,ni->neo", Wd, x)                                    # (N, E, d_out)
                yr = (ye.gather(1, idx.unsqueeze(-1).expand(N, K, dout)) * gates.unsqueeze(-1)).sum(1)
                gr = torch.autograd.grad(yr, (x, W0, W1, Rt), dy)
                res = {"y": compare("y", y, yr)}
                for k, a, b in zip(("dx", "dW0", "dW1", "drouter"), g, gr):
                    res[k] = compare(k, a, b)
                report(f"btt_moe {din}->{dout} {E}/top{K} ({variant})", res)
    print(f"--check: {'all passed' if fails == 0 else f'{fails} FAILED'} (float64 on the CPU; tolerance 1e-10 relative to max |ref|)")
    return 1 if fails else 0


# ------------------------------------------------------------------------------------------------
# timing

def make_layer(kind, prm, din, dout, dev, dt, moe_variant):
    """(forward function of x, list of parameters)."""
    def rnd(*shape, a):
        return ((torch.rand(*shape, device=dev, dtype=torch.float32) * 2 - 1) * a).to(dt).requires_grad_(True)

    if kind == "dense":
        W = rnd(dout, din, a=math.sqrt(3 / din))
        return (lambda x: F.linear(x, W)), [W]
    if kind == "btt":
        A, G, P, Ep, R = prm["alpha"], prm["gamma"], prm["phi"], prm["eps"], prm["rank"]
        W0 = rnd(G, A, P * R, a=math.sqrt(3 / A))
        W1 = rnd(P, G * R, Ep, a=math.sqrt(3 / (G * R)))
        return (lambda x: btt(x, W0, W1, (A, G, P, Ep, R))), [W0, W1]
    if kind == "monarch":
        nb = prm["nb"]
        p, s = din // nb, dout // nb
        q = min(p, s)
        Rm = rnd(nb, q, p, a=math.sqrt(3 / p))
        Lm = rnd(nb, s, q, a=math.sqrt(3 / q))
        return (lambda x: monarch(x, Rm, Lm)), [Rm, Lm]
    A, G, P, Ep, E, K = prm["alpha"], prm["gamma"], prm["phi"], prm["eps"], prm["experts"], prm["topk"]
    W0 = rnd(G, A, P * E, a=math.sqrt(3 / A))
    W1 = rnd(P, G * E, Ep, a=math.sqrt(3 / G))
    Rt = rnd(E, din, a=math.sqrt(3 / din))
    return (lambda x: moe(x, W0, W1, Rt, (A, G, P, Ep, E), K, moe_variant)), [W0, W1, Rt]


def time_ms(fn, warmup, reps, cuda):
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / reps
    best = float("inf")  # on a CPU each rep alone, the best: a shared machine's mean measures its other tenants
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def run_bench(args):
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("structured_torch.py: torch.cuda.is_available() is False; use --device cpu to try the script without a GPU", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    dt = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"structured_torch.py: PyTorch {torch.__version__} on {name}, {str(dt).replace('torch.', '')}, N = {args.n}, "
          f"{'mean' if cuda else 'best'} of {args.reps} after {args.warmup}; BTT-MoE variant: {args.moe}; "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'d':>5} {'shape':12s} {'structure':13s} {'fwd ms':>9s} {'fwd+bwd ms':>10s}")
    only = set(args.only.split(",")) if args.only else None
    torch.manual_seed(0)
    for d in args.dims:
        for shape in args.shapes:
            din, dout = d, (4 * d if shape == "fc" else d)
            results = []
            for cname, kind, prm in cases(din, dout):
                if only and cname not in only:
                    continue
                fwd_ms = ms = float("nan")
                note = ""
                try:
                    x = (torch.rand(args.n, din, device=dev) * 2 - 1).to(dt).requires_grad_(True)
                    dy = (torch.rand(args.n, dout, device=dev) * 2 - 1).to(dt)
                    f, params = make_layer(kind, prm, din, dout, dev, dt, args.moe)
                    inputs = [x] + params

                    def fwd():
                        with torch.no_grad():
                            f(x)

                    def step():
                        y = f(x)
                        torch.autograd.grad(y, inputs, dy)

                    fwd_ms = time_ms(fwd, args.warmup, args.reps, cuda)
                    ms = time_ms(step, args.warmup, args.reps, cuda)
                except torch.cuda.OutOfMemoryError:
                    note = " note=oom"
                finally:
                    x = dy = f = params = inputs = None
                    if cuda:
                        torch.cuda.empty_cache()
                print(f"{d:5d} {f'{din}->{dout}':12s} {cname:13s} {fwd_ms:9.3f} {ms:10.3f}{'  out of memory' if note else ''}")
                results.append(f"RESULT d={d} din={din} dout={dout} struct={cname} ms={ms:.4f} fwd_ms={fwd_ms:.4f}{note}")
                sys.stdout.flush()
            print("\n".join(results))
            print()
    return 0


def main():
    ap = argparse.ArgumentParser(description="PyTorch baseline of the structured-layer benchmark (see the module docstring)")
    ap.add_argument("--check", action="store_true", help="float64 CPU check against dense materialisations, then exit")
    ap.add_argument("--dims", default="768,1024,2048,4096", help="widths d (default 768,1024,2048,4096)")
    ap.add_argument("--shapes", default="fc", help="fc (d -> 4d), sq (d -> d), or fc,sq (default fc)")
    ap.add_argument("-n", type=int, default=32768, help="rows (default 32768)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated structure names (default: all)")
    ap.add_argument("--moe", choices=("mask_z", "separate"), default="mask_z",
                    help="BTT-MoE: mask each expert's z by its gate before the rank-E second stage (the paper's code), "
                         "or keep every expert's output and weight them (default mask_z)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args()
    if args.check:
        return run_check()
    try:
        args.dims = [int(v) for v in args.dims.split(",") if v]
    except ValueError:
        ap.error(f"--dims {args.dims}: expected comma-separated integers")
    args.shapes = [s for s in args.shapes.split(",") if s]
    if not args.shapes or any(s not in ("fc", "sq") for s in args.shapes):
        ap.error("--shapes: fc, sq or fc,sq")
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
