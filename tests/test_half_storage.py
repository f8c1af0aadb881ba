"""Frozen weights in fp16, arithmetic in fp32: the same outputs and gradients as an fp32 model
whose weights were rounded to fp16, at half the weight memory; LoRA trains through it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import FAST
from personalize.half_storage import restore_fp32, store_frozen_in_half


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.norm = nn.GroupNorm(2, 8)
        self.lin = nn.Linear(8, 5)
        self.trained = nn.Linear(5, 5)  # stands in for a LoRA layer: it requires grad and stays fp32

    def forward(self, x):
        h = self.norm(self.strided(self.conv(x))).mean((2, 3))
        return self.trained(self.lin(h))


@pytest.fixture
def nets():
    torch.manual_seed(0)
    ref = Net()
    ref.requires_grad_(False)
    ref.trained.requires_grad_(True)
    half = copy.deepcopy(ref)
    with torch.no_grad():  # the reference holds exactly the fp16-rounded weights, in fp32
        for m in (ref.conv, ref.strided, ref.lin):
            m.weight.copy_(m.weight.half().float())
    return ref, half


def test_outputs_and_gradients_match_the_rounded_fp32_model(nets):
    ref, half = nets
    n = store_frozen_in_half(half)
    assert n == sum(m.weight.numel() for m in (ref.conv, ref.strided, ref.lin))
    assert half.conv.weight.dtype == torch.float16 and half.conv.bias.dtype == torch.float32
    assert half.norm.weight.dtype == torch.float32 and half.trained.weight.dtype == torch.float32
    x = torch.randn(2, 3, 10, 10)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xi) for m, xi in zip((ref, half), xs)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for o in outs:
        o.square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half.trained.weight.grad, ref.trained.weight.grad, rtol=1e-5, atol=1e-6)
    assert half.conv.weight.grad is None  # frozen stays frozen


def test_autograd_keeps_no_fp32_copy_of_a_frozen_weight(nets):
    _, half = nets
    store_frozen_in_half(half)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        half(torch.randn(2, 3, 10, 10, requires_grad=True)).sum().backward()
    shapes32 = {tuple(t.shape) for t in saved if t.dtype == torch.float32}
    for m in (half.conv, half.strided, half.lin):
        assert tuple(m.weight.shape) not in shapes32


def test_restore_gives_plain_fp32_modules(nets):
    ref, half = nets
    store_frozen_in_half(half)
    restore_fp32(half)
    assert all(p.dtype == torch.float32 for p in half.parameters()) and "forward" not in half.conv.__dict__
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(half(x), ref(x))


@pytest.mark.slow
def test_cpu_half_weights_lora_run(photos, tmp_path, cli, tiny_base):
    from diffusers import StableDiffusionPipeline

    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", tmp_path / "r", *FAST,
            "--cpu-half-weights", "--lr", "1e-2")
    assert r.code == 0, r.err
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["config"]["cpu_half_weights"] and (tmp_path / "r" / "validation.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    before = pipe("a sks dog", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images
    pipe.load_lora_weights(tmp_path / "r")
    g = torch.Generator().manual_seed(0)
    after = pipe("a sks dog", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images
    assert abs(after - before).max() > 1e-4


@pytest.mark.parametrize("flags, conv_dtype, released", [
    ((), torch.float32, False),
    (("--cpu-half-weights",), torch.float16, False),
    # a quantized base keeps the convs bitsandbytes cannot quantize in fp16 too (CPU, fp32)
    (("--base-quantization", "nf4"), torch.float16, False),
    (("--release-freed-memory",), torch.float32, True),
])
def test_the_frozen_convs_a_cpu_fp32_run_trains_on(flags, conv_dtype, released, photos, tmp_path, cli, monkeypatch):
    """What the memory flags change in the run itself: the dtype the frozen U-Net's convs are held
    in while fit runs, and whether the allocator policy was set."""
    import personalize.dreambooth as db

    seen, calls = {}, []
    real_fit = db.fit

    def spy_fit(accelerator, models, *a, **k):
        convs = [m for m in models["unet"].modules() if type(m) is nn.Conv2d]
        seen["dtypes"] = {m.weight.dtype for m in convs}
        return real_fit(accelerator, models, *a, **k)

    monkeypatch.setattr(db, "fit", spy_fit)
    monkeypatch.setattr(db, "return_freed_memory", lambda: calls.append(1) or True)
    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", tmp_path / "r", "--base", "tiny",
            "--steps", "1", "--class-images", "0", "--validation-images", "0", "--mixed-precision", "no", *flags)
    assert r.code == 0, r.err
    assert seen["dtypes"] == {conv_dtype}
    assert bool(calls) == released
