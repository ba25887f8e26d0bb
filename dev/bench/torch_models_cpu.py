#!/usr/bin/env python3
"""dev/bench/torch_models_cpu.py: PyTorch's time for one training step of the same models as
dev/bench/models_cpu.sh, on the CPU in float32: the PyTorch column of `TORCH=1 bash
dev/bench/models_cpu.sh`.

The model is dev/reference.py's (the test-mode reference, written from DESIGN.md's mathematics):
dense layers as matmuls, BTT and Monarch as two einsums (which PyTorch runs as permute, copy and
batched matmul, as the papers' code does), BTT-MoE with every expert computed and the outputs
weighted by the gates (zero for the experts a token did not select), attention as two matmuls
with a masked softmax. A step is forward, backward and torch.optim.AdamW (foreach), like the
trainer's step; the time is the mean of steps 2..STEPS, as models_cpu.sh takes ours.

    python3 dev/bench/torch_models_cpu.py CONFIG [CONFIG ...] [-b 8] [-t 128] [--steps 5]

CONFIG: a config file (scripts/configs/*.conf) or dN (GPT-2 of depth N, as the trainer's -e dN).
Prints a line per config: RESULT config=NAME ms=MEAN
"""
import argparse
import os
import sys
import time

try:
    import torch
except ImportError as e:
    print(f"torch_models_cpu.py: PyTorch is not installed ({e}); pip install torch", file=sys.stderr)
    sys.exit(2)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import reference as ref  # noqa: E402  (dev/reference.py)


def config_text(spec):
    """The text of a config file, or of GPT-2 of depth N for dN (the trainer's widths for -e dN)."""
    if spec.startswith("d") and spec[1:].isdigit():
        depth = int(spec[1:])
        widths = {2: 128, 4: 256, 6: 384, 12: 768, 24: 1024, 36: 1280, 48: 1600, 60: 1920}  # common/config.h's
        width = widths.get(depth)
        if width is None:
            raise SystemExit(f"torch_models_cpu.py: {spec}: no GPT-2 preset of that depth; use one of "
                             + " ".join(f"d{d}" for d in widths) + ", or a config file")
        return (f"n_layer = {depth}\nn_head = {width // 64}\nn_embd = {width}\nvocab_size = 50257\n"
                f"max_seq_len = 1024\n")
    try:
        with open(spec) as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"torch_models_cpu.py: {spec}: {e.strerror}; give a config file or dN")


def step_ms(spec, B, T, steps):
    ref.DT = torch.float32
    cfg = ref.parse_config(config_text(spec), spec)
    model = ref.build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    P = {k: v.float().requires_grad_(True) for k, v in ref.init_params2(model, cfg, gen).items()}
    opt = torch.optim.AdamW(list(P.values()), lr=3e-4, weight_decay=0.0, foreach=True)
    idx = torch.randint(0, cfg["vocab_size"], (B, T), generator=gen)
    targets = torch.randint(0, cfg["vocab_size"], (B, T), generator=gen)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, total, _, _, _ = ref.forward2(P, model, cfg, idx, targets)
        total.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    later = times[1:] or times
    return 1e3 * sum(later) / len(later)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="config files or dN")
    ap.add_argument("-b", type=int, default=8, help="batch size B (default 8)")
    ap.add_argument("-t", type=int, default=128, help="sequence length T (default 128)")
    ap.add_argument("--steps", type=int, default=5, help="steps; the mean of steps 2.. is printed (default 5)")
    args = ap.parse_args()
    if args.b < 1 or args.t < 1 or args.steps < 1:
        ap.error("-b, -t and --steps must be at least 1")
    for spec in args.configs:
        try:
            ms = step_ms(spec, args.b, args.t, args.steps)
        except ref.ConfigError as e:
            raise SystemExit(f"torch_models_cpu.py: {e}")
        name = os.path.basename(spec)
        name = name[:-5] if name.endswith(".conf") else name
        print(f"RESULT config={name} ms={ms:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
