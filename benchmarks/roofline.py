"""A training step against its floor, op by op: every aten op of one real step of `train_subject`
with its FLOPs, the bytes it reads and writes, the time it took, and its roofline floor (the longer
of its FLOPs at the matmul peak and its bytes at the read bandwidth, both measured in the same process).

    python benchmarks/roofline.py                   # bk-sdm-small shape, 256 px, LoRA r16, auto precision
    python benchmarks/roofline.py --mixed-precision no

Three floors of one step, each a lower bound on its time on this machine:
- compute: the step's FLOPs at the matmul peak of its precision (bf16, or fp32 for an fp32 run; an op
  that computes in fp32 inside a bf16 step is held to the bf16 peak all the same), as if every op were
  a large GEMM;
- memory: every byte the step's ops touch at the read bandwidth, as if nothing were compute;
- per-op roofline: each op at the slower of its two limits (and never above its own measured time:
  an op whose data sat in cache beats the memory bound), summed, as the ops run one after another:
  a GEMM of a frozen weight with 128 rows is bound by reading the weight, not by its FLOPs.
The last is the floor of the ops the step runs as they are; a compiler that fused the element-wise
ops into their neighbours would lower it (the table's `elementwise` and `copies` rows say by how much
at most). The step's own s/step is the median of the steps after the counted one, with no counter on.

How the step is counted: a `TorchDispatchMode` over exactly one optimizer step (entered by a `fit` hook
after the warm-up, left by the next), which sees every op below autograd and autocast: forward,
backward, casts and the optimizer. FLOPs: torch's own formulas (`torch.utils.flop_counter`), plus
SDPA's CPU flash kernel (4 B H Lq Lk D forward, twice that backward, as torch counts its CUDA kernels).
Bytes: each distinct input and output tensor once (an in-place op's tensor once; an expanded one at its
storage's size; an embedding lookup at its rows, not its table). Views move no data and are skipped.
Prints the tables (the floors; ops by time; the largest gaps to the floor by op and input shapes)
and writes JSON (default benchmarks/results/roofline.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import ROOT, bench_pipeline, cpu_name, synthetic_photos, write_results  # noqa: E402

# ops that move data without arithmetic a fused implementation would need
COPIES = {"aten._to_copy", "aten.copy_", "aten.clone", "aten.cat", "aten.new_zeros", "aten.zero_", "aten.fill_",
          "aten.constant_pad_nd", "aten.im2col", "aten.col2im"}
GEMMS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution", "aten.convolution_backward",
         "aten._scaled_dot_product_flash_attention_for_cpu",
         "aten._scaled_dot_product_flash_attention_for_cpu_backward"}
NOT_VIEWS_BUT_FREE = {"aten._unsafe_view", "aten.lift_fresh"}


def peaks(repeat: int = 10, rounds: int = 3) -> dict:
    """GFLOP/s of a 2048^2 matmul and of a 3x3 conv of 320 channels at 32x32 (the U-Net's first stage at
    256 px), bf16 and fp32, each the best of `rounds` rounds."""
    import torch
    import torch.nn.functional as F

    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        x, w = torch.randn(2, 320, 32, 32, dtype=dtype), torch.randn(320, 320, 3, 3, dtype=dtype)
        for label, fn, flops in (("matmul 2048", lambda: a @ b, 2 * 2048**3),
                                 ("conv3x3 320ch 32x32 b2", lambda: F.conv2d(x, w, padding=1), 2 * 2 * 320 * 320 * 9 * 32 * 32)):
            fn()
            fn()
            best = float("inf")
            for _ in range(rounds):  # a peak is the best the machine did: a busy neighbour only lowers a round
                t = time.perf_counter()
                for _ in range(repeat):
                    fn()
                best = min(best, time.perf_counter() - t)
            out[f"{label} {name}"] = flops * repeat / best / 1e9
    return out


def read_bandwidth(repeat: int = 10) -> float:
    """GB/s of summing a 512 MiB bf16 tensor (every thread, best of 3 rounds): how fast a frozen weight can be
    read once from memory."""
    import torch

    a = torch.ones(2**28, dtype=torch.bfloat16)
    a.sum()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeat):
            a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * a.element_size() * repeat / best / 1e9


def sdpa_cpu_flops(backward: bool, q_shape, k_shape) -> int:
    """FLOPs of SDPA's CPU flash kernel, forward or backward, counted as torch counts its CUDA kernels."""
    b, h, lq, d = q_shape
    return 4 * b * h * lq * k_shape[-2] * d * (2 if backward else 1)


def sdpa_cpu_formulas() -> dict:
    """`FlopCounterMode(custom_mapping=...)` entries for the CPU flash kernel (torch 2.13 counts only CUDA's)."""
    import torch

    ops = torch.ops.aten
    return {ops._scaled_dot_product_flash_attention_for_cpu: lambda q, k, *a, **kw: sdpa_cpu_flops(False, q, k),
            ops._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda grad, q, k, *a, **kw: sdpa_cpu_flops(True, q, k)}


def _nbytes(t) -> int:
    n = t.numel() * t.element_size()
    try:
        return min(n, t.untyped_storage().nbytes())  # an expanded tensor reads its storage, not its numel
    except (RuntimeError, NotImplementedError):
        return n


def make_counter(matmul_peak: float, read_bytes_s: float):
    """A dispatch mode counting, per op name: calls, FLOPs, bytes, wall seconds, floor seconds."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = defaultdict(lambda: {"calls": 0, "flops": 0, "bytes": 0, "seconds": 0.0, "floor": 0.0})
            self.shapes = defaultdict(lambda: {"calls": 0, "seconds": 0.0, "floor": 0.0})  # by op and input shapes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            t = time.perf_counter()
            out = func(*args, **kwargs)
            seconds = time.perf_counter() - t
            name = str(func._overloadpacket)
            if func.is_view or name in NOT_VIEWS_BUT_FREE:
                return out
            packet = func._overloadpacket
            if packet in flop_registry:
                flops = flop_registry[packet](*args, **kwargs, out_val=out)
            elif name.startswith("aten._scaled_dot_product_flash_attention_for_cpu"):
                backward = name.endswith("_backward")  # (grad_out, query, key, ...) against (query, key, ...)
                flops = sdpa_cpu_flops(backward, args[int(backward)].shape, args[int(backward) + 1].shape)
            else:
                flops = 0
            if name == "aten.embedding":  # the rows looked up, written out
                nbytes = 2 * _nbytes(out)
            else:
                seen, nbytes = set(), 0
                for x in tree_flatten((args, kwargs, out))[0]:
                    if isinstance(x, torch.Tensor) and x.device.type == "cpu":
                        key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape))
                        if key not in seen:
                            seen.add(key)
                            nbytes += _nbytes(x)
            row = self.ops[name]
            row["calls"] += 1
            row["flops"] += flops
            row["bytes"] += nbytes
            row["seconds"] += seconds
            # an op whose data sat in cache beat the memory bound: its floor is then its own time
            floor = min(seconds, max(flops / matmul_peak, nbytes / read_bytes_s))
            row["floor"] += floor
            inputs = [f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" for x in tree_flatten(args)[0]
                      if isinstance(x, torch.Tensor)][:3]
            by_shape = self.shapes[f"{name} {', '.join(inputs)}"]
            by_shape["calls"] += 1
            by_shape["seconds"] += seconds
            by_shape["floor"] += floor
            return out

    return Counter()


def count_step(a, base: Path, work: Path, counter) -> dict:
    """One `train_subject` run: warm-up steps, one counted step, then `--steps` timed steps."""
    from personalize.config import TrainConfig
    from personalize.dreambooth import train_subject
    from personalize.fit import Hook

    import json

    counted = a.warmup + 1

    def toggle(step, models):
        if step == a.warmup:
            counter.__enter__()
        elif step == counted:
            counter.__exit__(None, None, None)

    photos = synthetic_photos(work / "photos", 4, a.resolution)
    total = counted + a.steps
    cfg = TrainConfig(method=a.method, subject=str(photos), class_noun="dog", base=str(base), steps=total,
                      resolution=a.resolution, class_images=1, class_image_steps=2, class_image_batch_size=1,
                      mixed_precision=a.mixed_precision, checkpoint_every=0, validation_images=0, log_every=total,
                      rank=a.rank, text_encoder_rank=a.rank, output_dir=str(work / "run"))
    t = time.perf_counter()
    run = train_subject(cfg, log=lambda s: None, progress=False, profile_steps=True, hooks=(Hook("count", 1, toggle),))
    stats = json.loads((run / "run.json").read_text())["stats"]
    timed = sorted(stats["step_seconds"][counted:])
    return {"precision": stats["mixed_precision"], "step_seconds": stats["step_seconds"],
            "counted_step_s": stats["step_seconds"][counted - 1], "step_s": timed[len(timed) // 2],
            "run_s": time.perf_counter() - t}


def summarise(ops: dict, step_s: float, counted_step_s: float, matmul_peak_s: float, read_bytes_s: float) -> dict:
    total = {k: sum(r[k] for r in ops.values()) for k in ("calls", "flops", "bytes", "seconds", "floor")}
    groups = defaultdict(float)
    for name, r in ops.items():
        groups["GEMMs, convs, attention" if name in GEMMS else "copies and casts" if name in COPIES
               else "element-wise, norms, optimizer"] += r["floor"]
    floors = {"compute": total["flops"] / matmul_peak_s, "memory": total["bytes"] / read_bytes_s,
              "per-op roofline": total["floor"]}
    return {"total": total, "floors_s": floors, "floor_by_group_s": dict(groups),
            "step_over_floor": {k: v / step_s for k, v in floors.items()},
            # the ops' own time; the rest of an uncounted step is Python, autograd and the loop
            "in_ops_s": total["seconds"], "outside_ops_s": step_s - total["seconds"],
            "counter_overhead_s": counted_step_s - step_s}


def step_parser(description: str, out: str, steps_help: str) -> argparse.ArgumentParser:
    """The step's shape, as this script and profile_step.py take it."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="bk-sdm-small")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help=steps_help)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache/personalize/bench"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results" / out))
    return p


def prepare(a) -> Path:
    """`auto` precision resolved in place (as personalize resolves it on this CPU); the random-weight base."""
    from personalize.precision import resolve_mixed_precision

    a.mixed_precision = resolve_mixed_precision(a.mixed_precision, cpu=True)
    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    return bench_pipeline(a.model, cache)


def main() -> int:
    p = step_parser(__doc__.split("\n")[0], "roofline.json", "timed steps after the counted one")
    p.add_argument("--method", default="lora")
    a = p.parse_args()

    import torch

    base = prepare(a)
    peak, bandwidth = peaks(), read_bandwidth()
    # the run's compute precision sets the peak for every op's FLOPs, whatever dtype an op chose to run in
    compute_peak = peak[f"matmul 2048 {'bfloat16' if a.mixed_precision in ('bf16', 'fp16') else 'float32'}"] * 1e9
    counter = make_counter(compute_peak, bandwidth * 1e9)
    with tempfile.TemporaryDirectory() as work:
        run = count_step(a, base, Path(work), counter)
    ops = {k: dict(v) for k, v in sorted(counter.ops.items(), key=lambda kv: -kv[1]["seconds"])}
    doc = {"device": cpu_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "settings": {k: getattr(a, k) for k in ("model", "method", "resolution", "rank", "steps", "warmup",
                                                   "mixed_precision")},
           "peaks_gflops": peak, "read_gb_s": bandwidth, "run": run,
           "summary": summarise(ops, run["step_s"], run["counted_step_s"], compute_peak, bandwidth * 1e9), "ops": ops,
           # where the time above the floor goes: op and input shapes, largest gap first
           "gaps": dict(sorted(((k, dict(v)) for k, v in counter.shapes.items()),
                               key=lambda kv: kv[1]["floor"] - kv[1]["seconds"])[:40])}
    print_tables(doc)
    write_results(a.out, doc)
    return 0


def print_tables(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=160)
    s, run = doc["summary"], doc["run"]
    timed = len(run["step_seconds"]) - doc["settings"]["warmup"] - 1
    con.print(f"{doc['device']}; torch {doc['torch']}; {doc['settings']}")
    con.print(f"matmul peaks: bf16 {doc['peaks_gflops']['matmul 2048 bfloat16']:.0f}, fp32 "
              f"{doc['peaks_gflops']['matmul 2048 float32']:.0f} GFLOP/s; read {doc['read_gb_s']:.1f} GB/s")
    con.print(f"one step: {s['total']['flops'] / 1e12:.3f} TFLOP, {s['total']['bytes'] / 1e9:.2f} GB touched, "
              f"{s['total']['calls']} ops; {run['step_s']:.3f} s/step (median of {timed} uncounted steps); counted step {run['counted_step_s']:.3f} s, "
              f"{s['in_ops_s']:.3f} s in its ops, so ~{s['outside_ops_s']:.3f} s of a step is outside them (Python, autograd)")
    t = Table(title="floors of one step")
    for c in ("floor", "s", "floor / step"):
        t.add_column(c)
    for k, v in s["floors_s"].items():
        t.add_row(k, f"{v:.3f}", f"{s['step_over_floor'][k]:.2f}")
    for k, v in s["floor_by_group_s"].items():
        t.add_row(f"  per-op roofline: {k}", f"{v:.3f}", "")
    con.print(t)
    t = Table(title="ops by time (counted step)")
    for c in ("op", "calls", "GFLOP", "GB", "ms", "floor ms", "floor / ms"):
        t.add_column(c)
    for name, r in list(doc["ops"].items())[:25]:
        t.add_row(name, str(r["calls"]), f"{r['flops'] / 1e9:.1f}", f"{r['bytes'] / 1e9:.3f}", f"{r['seconds'] * 1e3:.1f}",
                  f"{r['floor'] * 1e3:.1f}", f"{r['floor'] / r['seconds']:.2f}" if r["seconds"] else "")
    con.print(t)
    t = Table(title="largest gaps to the floor, by op and input shapes (counted step)")
    for c in ("op and inputs", "calls", "ms", "floor ms", "gap ms"):
        t.add_column(c)
    for key, r in list(doc["gaps"].items())[:15]:
        t.add_row(key[:110], str(r["calls"]), f"{r['seconds'] * 1e3:.1f}", f"{r['floor'] * 1e3:.1f}",
                  f"{(r['seconds'] - r['floor']) * 1e3:.1f}")
    con.print(t)


if __name__ == "__main__":
    sys.exit(main())
