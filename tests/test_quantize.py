"""--base-quantization nf4|int8 (QLoRA): the frozen base's Linear layers in bitsandbytes, the
adapter trained on top and saved as one of the plain base (read back by diffusers), resume exact,
the refusals one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import FAST, kill_after_checkpoint
from personalize.adapters import ADAPTER_METHODS
from personalize.config import TrainConfig, for_method
from personalize.defaults import ADAPTER_METHOD_NAMES
from personalize.errors import UserError
from personalize.precision import resolve_mixed_precision
from personalize.quantize import UNSUPPORTED, check_backend, check_quantization, is_quantized, quantize_frozen, weight_bytes

QUANTIZATIONS = ("nf4", "int8")


def _dequantized(layer) -> torch.Tensor:
    """The weight a bitsandbytes layer computes with, through peft's own reader of bnb weights."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(64, 64)

    def forward(self, x):
        return self.to_q(x)


def _adapter(model, method):
    from personalize.adapters import attach_adapter

    cfg = TrainConfig(method=method, subject="-", rank=4, lora_unet_targets=["to_q"], oft_block_size=16,
                      boft_block_num=4, hra_rank=4)
    torch.manual_seed(0)
    attach_adapter(model, ADAPTER_METHODS[method].build(cfg, "unet"))
    return model


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("method", ADAPTER_METHOD_NAMES)
def test_each_allowed_method_trains_on_the_quantized_layer_as_on_its_dequantized_weight(quantization, method):
    """The support table against peft: an allowed adapter on the bitsandbytes layer gives the same
    outputs and gradients, step after step, as on a plain layer holding the dequantized weight; a
    refused one is a one-line UserError."""
    if (quantization, method) in UNSUPPORTED:
        with pytest.raises(UserError) as e:
            TrainConfig(method=method, subject="-", base_quantization=quantization).validate()
        assert method in str(e.value) and quantization in str(e.value) and "\n" not in str(e.value)
        return
    torch.manual_seed(1)
    q = _Attn()
    quantize_frozen(q, quantization, torch.float32, "cpu", torch.float32)
    ref = _Attn()
    ref.to_q.weight.data = _dequantized(q.to_q)
    ref.to_q.bias.data = q.to_q.bias.data.float().clone()
    _adapter(q, method), _adapter(ref, method)
    trained = [(p, r) for p, r in zip(q.parameters(), ref.parameters()) if p.requires_grad]
    assert trained and all(r.requires_grad for _, r in trained)
    for p, r in trained:  # away from the identity init, so every adapter tensor matters
        p.data += 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        r.data = p.data.clone()
    for step in range(3):
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(step))
        y, yr = q(x), ref(x)
        torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
        (y ** 2).sum().backward(), (yr ** 2).sum().backward()
        with torch.no_grad():
            for p, r in trained:
                torch.testing.assert_close(p.grad, r.grad, rtol=1e-3, atol=1e-4)
                p -= 1e-3 * p.grad
                r -= 1e-3 * r.grad
                p.grad = r.grad = None
    from peft.utils import get_peft_model_state_dict

    assert get_peft_model_state_dict(q).keys() == get_peft_model_state_dict(ref).keys()


@pytest.mark.parametrize("quantization,ratio", [("nf4", (0.25, 0.30)), ("int8", (0.5, 0.52))])
def test_linear_layers_swapped_convs_kept_and_the_bytes_shrink(quantization, ratio, tiny_base):
    from personalize.sources import load_components

    comps = load_components(tiny_base, dtype=torch.bfloat16)
    for k in ("unet", "text_encoder"):
        linears = [n for n, m in comps[k].named_modules() if type(m) is nn.Linear]
        convs = [n for n, m in comps[k].named_modules() if type(m) is nn.Conv2d]
        assert quantize_frozen(comps[k], quantization, torch.bfloat16, "cpu", torch.bfloat16) == len(linears) > 0
        mods = dict(comps[k].named_modules())
        assert all(is_quantized(mods[n]) for n in linears) and all(type(mods[n]) is nn.Conv2d for n in convs)
    # the bytes at the BK-SDM widths (320-1280; the tiny base's 32-wide layers are all overhead)
    model = nn.Sequential(nn.Linear(320, 1280), nn.Linear(1280, 320), nn.Linear(768, 320)).to(torch.bfloat16)
    before = sum(weight_bytes(m) for m in model)
    quantize_frozen(model, quantization, torch.bfloat16, "cpu")
    assert all(is_quantized(m) for m in model)
    assert ratio[0] * before <= sum(weight_bytes(m) for m in model) <= ratio[1] * before


@pytest.mark.slow
@pytest.mark.parametrize("quantization, precision", [("nf4", "auto"), ("int8", "auto"), ("nf4", "no")])
def test_quantized_run_trains_resumes_exactly_and_its_lora_loads_on_the_plain_base(
        quantization, precision, photos, tmp_path, cli, monkeypatch, lora_run, tiny_base):
    """Under --mixed-precision auto (bf16 on a CPU with native bf16, fp32 elsewhere) and in fp32 (the
    convs then in fp16 storage) on any CPU."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    args = ["lora", "--subject", photos, "--class-noun", "dog", *FAST, "--lr", "1e-2", "--steps", "6",
            "--checkpoint-every", "3", "--log-every", "1", "--validation-images", "0",
            "--base-quantization", quantization, "--mixed-precision", precision]
    r = cli(*args, "--output-dir", tmp_path / "a")
    assert r.code == 0, r.err
    whole_again = kill_after_checkpoint(monkeypatch, 3)
    assert cli(*args, "--output-dir", tmp_path / "b").code == 130
    whole_again()
    assert cli(*args, "--output-dir", tmp_path / "b", "--resume").code == 0
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "logs" / "loss.csv").read_text() == (tmp_path / "b" / "logs" / "loss.csv").read_text()
    losses = [float(row.split(",")[1]) for row in (tmp_path / "a" / "logs" / "loss.csv").read_text().splitlines()[1:]]
    assert len(set(losses)) > 1
    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    assert meta["config"]["base_quantization"] == quantization
    assert meta["stats"]["mixed_precision"] == resolve_mixed_precision(precision, cpu=True)  # auto: bf16 where native
    # a plain adapter of the unquantized base: a plain run's keys, read by diffusers on the fp32 base
    assert a.keys() == load_file(lora_run / "pytorch_lora_weights.safetensors").keys()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        g = torch.Generator().manual_seed(0)
        return pipe("a sks dog", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images

    before = draw()
    pipe.load_lora_weights(tmp_path / "a")
    assert abs(draw() - before).max() > 1e-4
    name = next(iter(pipe.unet.peft_config))  # every tensor of the file is what diffusers loaded
    loaded = {k.replace(f".{name}", ""): v for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=name).items()}
    unet_file = {k.removeprefix("unet."): v for k, v in a.items() if k.startswith("unet.")}
    assert loaded.keys() == unet_file.keys() and all(torch.equal(v, unet_file[k]) for k, v in loaded.items())


def test_full_and_unsupported_pairs_are_one_line_and_write_nothing(photos, tmp_path, cli):
    r = cli("full", "--subject", photos, "--class-noun", "dog", *FAST, "--base-quantization", "nf4",
            "--output-dir", tmp_path / "f")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "--base-quantization" in r.err
    with pytest.raises(UserError, match="full finetuning"):
        TrainConfig(method="full", subject="-", base_quantization="nf4").validate()
    r = cli("loha", "--subject", photos, "--class-noun", "dog", *FAST, "--base-quantization", "nf4",
            "--output-dir", tmp_path / "l")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "loha" in r.err and "nf4" in r.err
    assert "Traceback" not in r.err and not (tmp_path / "f").exists() and not (tmp_path / "l").exists()


def test_batch_applies_it_to_the_methods_that_read_it():
    template = TrainConfig(method="lora", subject="-", base_quantization="nf4")
    assert for_method(template, "full").base_quantization == "none"
    assert for_method(template, "dora").base_quantization == "nf4"
    for_method(template, "full").validate()
    with pytest.raises(UserError, match="loha"):
        for_method(template, "loha").validate()


def test_a_device_bitsandbytes_has_no_backend_for_is_one_line():
    with pytest.raises(UserError) as e:
        check_backend("nf4", "mps")
    assert "mps" in str(e.value) and "\n" not in str(e.value)
    check_backend("int8", "cpu")
    check_quantization("lora", "none")


def test_the_app_parser_path_takes_it_as_the_cli_does():
    from personalize.app.handlers import parse_as_cli

    assert parse_as_cli("lora", {"--base-quantization": "nf4"}, "--subject=-").base_quantization == "nf4"
    with pytest.raises(UserError, match="base-quantization"):
        parse_as_cli("full", {"--base-quantization": "nf4"}, "--subject=-")


def test_a_settings_file_and_batch_take_it(tmp_path):
    from personalize.cli import build_parser
    from personalize.commands.dreambooth import config_from_args

    f = tmp_path / "s.toml"
    f.write_text('subject = "dog"\nbase-quantization = "int8"\n')
    assert config_from_args(build_parser().parse_args(["lora", "--config", str(f)]), "lora").base_quantization == "int8"
    args = build_parser().parse_args(["batch", "--methods", "lora,full", "--base-quantization", "nf4"])
    assert args.base_quantization == "nf4"
