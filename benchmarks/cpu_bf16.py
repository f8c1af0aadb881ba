"""Is bf16 a speed lever on this CPU? Times the ops that dominate a Stable Diffusion training
step (3x3 conv, linear, SDPA attention at bk-sdm shapes) and one full bk-sdm-tiny-shaped U-Net
forward, in fp32 and in bf16 (weights and activations), forward only.

    python benchmarks/cpu_bf16.py            # prints a table, writes benchmarks/results/cpu_bf16.json

With AVX512-BF16 or AMX, oneDNN runs bf16 natively and it should win; on AVX2-only CPUs it is
emulated. `personalize` keeps fp32 as the CPU default and prints a note when bf16 is asked for on
a CPU without native support.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cases(resolution: int):
    import torch
    import torch.nn.functional as F

    lat = resolution // 8
    conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    x_conv = torch.randn(2, 320, lat, lat)
    lin = torch.nn.Linear(320, 1280)
    x_lin = torch.randn(2, lat * lat, 320)
    q = torch.randn(2, 8, lat * lat, 40)
    yield "conv3x3 320ch", conv, (x_conv,), lambda m, x: m(x)
    yield "linear 320->1280", lin, (x_lin,), lambda m, x: m(x)
    yield "sdpa self-attn", None, (q,), lambda m, x: F.scaled_dot_product_attention(x, x, x)


def main() -> int:
    import torch

    from benchmarks.train_speed import cpu_name
    from personalize.precision import cpu_bf16_is_native

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--unet", action=argparse.BooleanOptionalAction, default=True,
                   help="also one bk-sdm-tiny-shaped U-Net forward (random weights)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu_bf16.json"))
    a = p.parse_args()

    rows = []
    with torch.no_grad():
        for name, module, inputs, call in cases(a.resolution):
            row = {"op": name}
            for label, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                m = module.to(dt) if module is not None else None
                xs = [x.to(dt) for x in inputs]
                row[label] = timed(lambda: call(m, *xs), a.repeats)
            rows.append(row)
        if a.unet:
            from diffusers import UNet2DConditionModel

            from personalize.architectures import SD_V1_UNET_CONFIG, get_arch, student_config

            torch.manual_seed(0)
            unet = UNet2DConditionModel.from_config(student_config(SD_V1_UNET_CONFIG, get_arch("bk-tiny"))).eval()
            lat = a.resolution // 8
            x, t, c = torch.randn(1, 4, lat, lat), torch.tensor([500]), torch.randn(1, 77, 768)
            row = {"op": f"bk-sdm-tiny U-Net forward, {a.resolution}px"}
            for label, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                unet.to(dt)
                row[label] = timed(lambda: unet(x.to(dt), t, c.to(dt)), 1 if dt == torch.bfloat16 else a.repeats)
            rows.append(row)

    from rich.console import Console
    from rich.table import Table

    device = cpu_name()
    table = Table(title=f"bf16 vs fp32 on {device} (native bf16: {cpu_bf16_is_native()})")
    for col in ("op", "fp32 s", "bf16 s", "bf16 / fp32"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["op"], f"{r['fp32']:.4f}", f"{r['bf16']:.4f}", f"{r['bf16'] / r['fp32']:.1f}x")
    Console().print(table)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "native_bf16": cpu_bf16_is_native(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "resolution": a.resolution, "rows": rows,
                               "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
