"""Where a training step's time goes: `torch.profiler` over `train_subject`, by part and by op,
with the achieved GFLOP/s next to the machine's own bf16/fp32 matmul and conv peaks measured in
the same run.

    python benchmarks/profile_step.py                       # bk-sdm-small shape, 256 px, LoRA r16, auto precision
    python benchmarks/profile_step.py --mixed-precision no --steps 4

Three measurements, one process:
1. peaks: a 2048^2 matmul and a 3x3 conv of 320 channels at 32x32 (the U-Net's first stage at
   256 px), bf16 and fp32, GFLOP/s; and the read bandwidth (GB/s summing a 512 MiB tensor), for a
   roofline: a step reads each frozen weight at least twice (forward, input gradient);
2. the FLOPs of one training step (U-Net and text encoder forward + backward, LoRA attached, the
   run's batch: 1 photo + 1 class image), counted by torch's FlopCounterMode (the counter behind
   `personalize.architectures.module_macs`) on the run's real modules, SDPA's CPU flash kernel
   included (`roofline.sdpa_cpu_formulas`: torch counts only its CUDA kernels);
3. `personalize.dreambooth.train_subject` itself, unchanged, profiled over `--steps` steps after
   `--warmup`. Module hooks open a profiler range per part (text encoder, U-Net; inside the U-Net:
   attention, LoRA layers, norms, activations); backward ops are charged to the part whose forward
   op made them (the autograd sequence number ties the two); the optimizer is torch's own range.

Prints the tables and writes JSON (default benchmarks/results/profile_step.json). The profiler adds
its own overhead per op, so the s/step printed is from the profiled steps; compare parts as shares.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import peaks, prepare, read_bandwidth, sdpa_cpu_formulas, step_parser  # noqa: E402
from train_speed import cpu_name, write_results, peak_memory_mb, synthetic_photos  # noqa: E402

PARTS = ["text encoder", "unet: attention", "unet: lora", "unet: norms", "unet: activations", "unet: conv/linear/other",
         "optimizer", "other (loss, noise, clip, casts outside the models)"]


# ------------------------------------------------------------------ 2. FLOPs of one step
def step_flops(base: Path, resolution: int, rank: int, mixed_precision: str) -> dict:
    """Forward + backward FLOPs of one DreamBooth LoRA step (batch 2: photo + class image)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from personalize.adapters import add_adapter
    from personalize.config import TrainConfig
    from personalize.sources import load_components

    c = load_components(base)
    add_adapter(c["unet"], c["text_encoder"], TrainConfig(method="lora", subject="x", rank=rank, text_encoder_rank=rank))
    ids = c["tokenizer"](["a sks dog", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    lat = torch.randn(2, 4, resolution // 8, resolution // 8)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    counts = {}
    for part in ("text encoder", "unet"):
        with FlopCounterMode(display=False, custom_mapping=sdpa_cpu_formulas()) as fc, amp:
            emb = c["text_encoder"](ids)[0]
            if part == "text encoder":
                emb.float().sum().backward()
            else:
                emb = emb.detach()
                pred = c["unet"](lat, torch.tensor([500, 500]), emb).sample
                pred.float().pow(2).mean().backward()
        total = fc.get_total_flops()
        counts[part] = total - (counts.get("text encoder", 0) if part == "unet" else 0)
    counts["total"] = counts["text encoder"] + counts["unet"]
    # the bytes a step must read at least: every frozen weight once forward, once for the input gradient
    half = mixed_precision == "bf16"  # a LoRA run stores its frozen base in the compute dtype
    counts["frozen_weight_bytes"] = sum(p.numel() * (2 if half else 4) for m in (c["unet"], c["text_encoder"])
                                        for p in m.parameters() if not p.requires_grad)
    return counts


# ------------------------------------------------------------------ 3. the profile
class PartRanges:
    """Global module hooks: a profiler range around each part's forward, innermost part wins."""

    def __init__(self):
        import torch
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import Attention
        from peft.tuners.tuners_utils import BaseTunerLayer
        from transformers import CLIPTextModel

        self.torch = torch
        self.stack: list = []
        self.lora_ids: set[int] = set()
        self.handles = []
        nn = torch.nn
        # resolved once: `label` runs on every module's every forward
        self.kinds = ((CLIPTextModel, "text encoder"), (UNet2DConditionModel, "unet"), (Attention, "unet: attention"),
                      ((nn.GroupNorm, nn.LayerNorm), "norms"), ((nn.SiLU, nn.GELU), "activations"))
        self.tuner = BaseTunerLayer

    def label(self, m) -> str | None:
        if isinstance(m, self.tuner):  # its A/B (and DoRA magnitude) modules are the part "lora"
            for d in ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector"):
                subs = getattr(m, d, None)
                if isinstance(subs, self.torch.nn.ModuleDict):
                    self.lora_ids.update(id(x) for x in subs.values())
            return None
        if id(m) in self.lora_ids:
            return "lora"
        for cls, name in self.kinds:
            if isinstance(m, cls):
                return name
        return "activations" if type(m).__name__ in ("GEGLU", "GELU") else None

    def __enter__(self):
        from torch.nn.modules import module as mm

        def pre(m, args):
            lab = self.label(m)
            if lab is not None:
                rf = self.torch.autograd.profiler.record_function("part::" + lab)
                rf.__enter__()
                self.stack.append((id(m), rf))

        def post(m, args, out):
            if self.stack and self.stack[-1][0] == id(m):
                self.stack.pop()[1].__exit__(None, None, None)

        self.handles = [mm.register_module_forward_pre_hook(pre), mm.register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def classify(events) -> tuple[dict, dict, dict]:
    """Self CPU time (s) by part, by phase (forward/backward/optimizer/other) and by (part, op) from
    the event tree."""
    by_seq: dict[int, str] = {}

    def forward_part(e) -> str | None:
        labels = []
        p = e
        while p is not None:
            if p.name.startswith("part::"):
                labels.append(p.name[6:])
            p = p.cpu_parent
        if not labels:
            return None
        inner, outer = labels[0], labels[-1]
        if outer == "text encoder":
            return "text encoder"
        if inner in ("lora",):
            return "unet: lora" if outer == "unet" else "text encoder"
        if inner in ("norms", "activations"):
            return "unet: " + inner
        return {"unet": "unet: conv/linear/other"}.get(inner, inner)

    parts, phases, part_ops = defaultdict(float), defaultdict(float), defaultdict(float)
    info = []
    for e in events:
        chain, p = [], e
        while p is not None:
            chain.append(p)
            p = p.cpu_parent
        grad = next((x for x in chain if x.name.startswith("autograd::engine::evaluate_function")), None)
        opt = any(x.name.startswith("Optimizer.") for x in chain)
        part = None if grad or opt else forward_part(e)
        if part and getattr(e, "sequence_nr", -1) >= 0:
            by_seq.setdefault(e.sequence_nr, part)
        info.append((e, grad, opt, part))
    for e, grad, opt, part in info:
        s = e.self_cpu_time_total / 1e6
        if opt:
            part, phase = "optimizer", "optimizer"
        elif grad is not None:
            part, phase = by_seq.get(getattr(grad, "sequence_nr", -1), PARTS[-1]), "backward"
        elif part:
            phase = "forward"
        else:
            part, phase = PARTS[-1], "other"
        parts[part] += s
        phases[phase] += s
        part_ops[f"{part} | {phase} | {e.name}"] += s
    return dict(parts), dict(phases), dict(part_ops)


def profile_run(a, base: Path, work: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from personalize.config import TrainConfig
    from personalize.dreambooth import train_subject
    from personalize.fit import Hook

    photos = synthetic_photos(work / "photos", 4, a.resolution)
    cfg = TrainConfig(method="lora", subject=str(photos), class_noun="dog", base=str(base), steps=a.warmup + a.steps,
                      resolution=a.resolution, class_images=1, class_image_steps=2, class_image_batch_size=1,
                      mixed_precision=a.mixed_precision, checkpoint_every=0, validation_images=0,
                      log_every=a.warmup + a.steps, rank=a.rank, text_encoder_rank=a.rank, output_dir=str(work / "run"))
    sched = schedule(wait=a.warmup - 1, warmup=1, active=a.steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched, record_shapes=False) as prof, PartRanges():
        run = train_subject(cfg, log=lambda s: None, progress=False, profile_steps=True,
                            hooks=(Hook("profiler", 1, lambda step, models: prof.step()),))
    stats = json.loads((run / "run.json").read_text())["stats"]
    events = [e for e in prof.events() if not e.name.startswith("ProfilerStep")]
    parts, phases, part_ops = classify(events)
    ops = defaultdict(float)
    for e in events:
        ops[e.name] += e.self_cpu_time_total / 1e6
    n = a.steps
    return {"precision": stats["mixed_precision"], "step_seconds": stats["step_seconds"][a.warmup:],
            "parts_s": {k: v / n for k, v in parts.items()}, "phases_s": {k: v / n for k, v in phases.items()},
            "ops_s": {k: v / n for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:25]},
            "part_ops_s": {k: v / n for k, v in sorted(part_ops.items(), key=lambda kv: -kv[1])[:60]},
            "threads": torch.get_num_threads(), "peak_mb": peak_memory_mb()}


def main() -> int:
    a = step_parser(__doc__.split("\n")[0], "profile_step.json", "profiled steps").parse_args()

    import torch

    base = prepare(a)
    peak = peaks()
    bandwidth = read_bandwidth()
    flops = step_flops(base, a.resolution, a.rank, a.mixed_precision)
    with tempfile.TemporaryDirectory() as work:
        prof = profile_run(a, base, Path(work))
    step_s = sum(prof["step_seconds"]) / len(prof["step_seconds"])
    doc = {"device": cpu_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "settings": {k: getattr(a, k) for k in ("model", "resolution", "rank", "steps", "warmup", "mixed_precision")},
           "peaks_gflops": peak, "read_gb_s": bandwidth, "step_flops": flops, "profile": prof,
           "achieved_gflops": flops["total"] / step_s / 1e9}
    print_tables(doc)
    write_results(a.out, doc)
    return 0


def print_tables(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=160)
    prof, peak = doc["profile"], doc["peaks_gflops"]
    step_s = sum(prof["step_seconds"]) / len(prof["step_seconds"])
    prec = "bfloat16" if prof["precision"] == "bf16" else "float32"
    mm = peak[f"matmul 2048 {prec}"]
    con.print(f"{doc['device']}; torch {doc['torch']}; {doc['settings']}")
    con.print("peaks GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    con.print(f"one step: {doc['step_flops']['total'] / 1e12:.3f} TFLOP (U-Net {doc['step_flops']['unet'] / 1e12:.3f}, "
              f"text encoder {doc['step_flops']['text encoder'] / 1e12:.3f}); profiled {step_s:.3f} s/step = "
              f"{doc['achieved_gflops']:.0f} GFLOP/s = {doc['achieved_gflops'] / mm:.2f} of the {prec} matmul peak; "
              f"floor at that peak {doc['step_flops']['total'] / mm / 1e9:.3f} s")
    if "read_gb_s" in doc:  # a roofline: the weights a step must read, at the bandwidth measured here
        wb = doc["step_flops"]["frozen_weight_bytes"]
        read_s = 2 * wb / doc["read_gb_s"] / 1e9
        compute_s = doc["step_flops"]["total"] / mm / 1e9
        con.print(f"read bandwidth {doc['read_gb_s']:.1f} GB/s; frozen weights {wb / 2**20:.0f} MiB, read twice a step "
                  f"(forward, input gradient): {read_s:.3f} s; roofline floor max(compute, reads) "
                  f"{max(compute_s, read_s):.3f} s, both in turn {compute_s + read_s:.3f} s; the step is "
                  f"{max(compute_s, read_s) / step_s:.2f} / {(compute_s + read_s) / step_s:.2f} of them")
    total = sum(prof["parts_s"].values())

    def table(title: str, rows) -> None:
        t = Table(title=title)
        for c in (title.split(" (")[0], "s/step", "share"):
            t.add_column(c)
        for k, v in rows:
            t.add_row(k[:100], f"{v:.3f}", f"{v / total:.0%}")
        con.print(t)

    table("part (self CPU time per step)", [(k, prof["parts_s"].get(k, 0.0)) for k in PARTS])
    con.print("phases: " + ", ".join(f"{k} {v:.3f} s" for k, v in prof["phases_s"].items()))
    table("op (self CPU time per step)", list(prof["ops_s"].items())[:15])
    table("part | phase | op (self CPU time per step)", list(prof["part_ops_s"].items())[:25])

if __name__ == "__main__":
    sys.exit(main())
