"""SDPA's kernels on the CPU, per attention shape of an SD U-Net and its text encoder: its flash and
math kernels, and `personalize.attention_backward` (flash forward, the backward in fp32).

Where `attention_backward`'s figures come from: one diffusers `Attention` (or a bare SDPA call for
CLIP's causal 77-token self-attention) at each shape a bk-sdm / SD-v1 step meets at 256 px (latents
32x32: 1024 tokens at 320 channels, 256 at 640, 64 at 1280; cross-attention to 77 text tokens),
batch 2, timed forward + backward (a training step) and forward only (sampling; `attention_backward`
leaves a call without grad to SDPA), the kernels alternated in one process (median of `--repeat`
calls, twice each). bf16 under autocast as a run computes it, and fp32 (where the fp32 backward is
SDPA's own). Prints a table, writes JSON.

    python benchmarks/attention_kernels.py
    python benchmarks/attention_kernels.py --dtype bf16 --repeat 50
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_speed import cpu_name, write_results  # noqa: E402

# (name, channels, heads, queries, keys; None: a U-Net self-attention, 77: cross-attention to the text)
SHAPES = [("text encoder self (causal)", 768, 12, 77, "causal"),
          ("unet 8x8 self", 1280, 8, 64, None), ("unet 8x8 cross", 1280, 8, 64, 77),
          ("unet 16x16 cross", 640, 8, 256, 77), ("unet 16x16 self", 640, 8, 256, None),
          ("unet 32x32 cross", 320, 8, 1024, 77), ("unet 32x32 self", 320, 8, 1024, None)]


def time_shape(channels: int, heads: int, queries: int, keys, dtype, backward: bool, repeat: int) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    x = torch.randn(2, queries, channels, requires_grad=backward)
    if keys == "causal":  # CLIP's attention after its projections: (batch, heads, 77, 64)
        q, k, v = (torch.randn(2, heads, queries, channels // heads, requires_grad=backward) for _ in range(3))

        def call():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        attn = Attention(channels, cross_attention_dim=768 if keys else None, heads=heads, dim_head=channels // heads)
        attn.requires_grad_(False)
        ctx = torch.randn(2, keys, 768) if keys else None

        def call():
            return attn(x, encoder_hidden_states=ctx)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    if dtype == "bf16" and keys != "causal":
        attn.to(torch.bfloat16)  # a run's frozen base under bf16 mixed precision
    from personalize.attention_backward import fp32_attention_backward

    kernels = {"flash": contextlib.nullcontext, "math": lambda: sdpa_kernel(SDPBackend.MATH)}
    if backward:
        kernels["fp32 backward"] = fp32_attention_backward
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for kernel in [*kernels, *kernels]:
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            with kernels[kernel](), torch.set_grad_enabled(backward), amp:
                out = call()
            if backward:
                out.float().sum().backward()
            ts.append(time.perf_counter() - t0)
        times[kernel].append(statistics.median(ts) * 1000)
    return {k: min(v) for k, v in times.items()}  # the better of the two medians: the quieter moment


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16,fp32", help="bf16 (autocast, as a run on a native-bf16 CPU), fp32")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/attention_kernels.json"))
    a = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    rows = []
    for dtype in a.dtype.split(","):
        for name, channels, heads, queries, keys in SHAPES:
            pairs = queries * (77 if keys == "causal" else keys or queries)
            for backward in (True, False):
                t = time_shape(channels, heads, queries, keys, dtype, backward, a.repeat)
                rows.append({"shape": name, "dtype": dtype, "pass": "fwd+bwd" if backward else "fwd",
                             "pairs": pairs, "flash_ms": t["flash"], "math_ms": t["math"],
                             "fp32_backward_ms": t.get("fp32 backward")})
    table = Table(title=f"SDPA kernels per attention, batch 2 ({cpu_name()}); ours = attention_backward "
                        "(flash forward, fp32 backward; SDPA's own without grad)")
    for c in ("shape", "dtype", "pass", "queries x keys", "flash ms", "math ms", "ours ms", "ours / flash"):
        table.add_column(c)
    for r in rows:
        ours = r["fp32_backward_ms"]
        table.add_row(r["shape"], r["dtype"], r["pass"], str(r["pairs"]), f"{r['flash_ms']:.2f}", f"{r['math_ms']:.2f}",
                      *((f"{ours:.2f}", f"{ours / r['flash_ms']:.2f}") if ours else ("flash", "")))
    Console(width=140).print(table)
    import torch

    write_results(a.out, {"device": cpu_name(), "torch": torch.__version__,
                          "repeat": a.repeat, "rows": rows, "date": time.strftime("%Y-%m-%d")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
