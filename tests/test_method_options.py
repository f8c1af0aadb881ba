"""Options of the LoRA family (issue 27): rsLoRA, per-module rank/alpha patterns and LoRA+. Each
saved adapter is read back by an independent reader at the right scale and shapes: diffusers'
`load_lora_weights` (LoRA/DoRA files), peft's `PeftModel.from_pretrained` (LoHa/LoKr folders), the
`lycoris-lora` package (the kohya/LyCORIS exports); the merged export fuses them exactly."""

from __future__ import annotations

import json

import pytest

from conftest import kill_after_checkpoint
import torch

from test_methods import QUICK, _cfg, _inputs, _out, _perturb

PATTERNS = dict(rank_pattern={"down_blocks.0.*": 2, "layers.1.*": 3}, alpha_pattern={"up_blocks.3.*": 2.5})


def _fake_run(run_dir, method, base):
    """A finished run.json around an adapter saved by hand (what the exporters read)."""
    doc = {"status": "finished", "method": method, "subject": {"name": "dog", "class_noun": "dog"},
           "base": {"name": "tiny", "path": str(base)}, "token": "sks", "instance_prompt": "a sks dog"}
    (run_dir / "run.json").write_text(json.dumps(doc))


def _trained(method, tiny_base, tmp_path, **kw):
    from personalize.adapters import add_adapter, save_adapter
    from personalize.sources import load_components

    comps = load_components(tiny_base, False)
    add_adapter(comps["unet"], comps["text_encoder"], _cfg(method, **kw))
    _perturb(comps["unet"], 1)
    _perturb(comps["text_encoder"], 2)
    run = tmp_path / method
    run.mkdir()
    save_adapter(run, method, comps["unet"], comps["text_encoder"])
    _fake_run(run, method, tiny_base)
    return comps, run


def _lycoris_out(kohya_file, tiny_base, ids, x):
    """The kohya/LyCORIS file applied to a fresh base by the lycoris package's own loader."""
    from lycoris.wrapper import create_lycoris_from_weights
    from safetensors.torch import load_file

    from personalize.sources import load_components

    comps = load_components(tiny_base, False)
    te = comps["text_encoder"]
    if not hasattr(te, "text_model"):  # kohya names the text encoder by CLIP's text_model. path
        te = torch.nn.Module()
        te.text_model = comps["text_encoder"]
    sd = load_file(str(kohya_file))
    for prefix, module in (("lora_unet_", comps["unet"]), ("lora_te_", te)):
        part = {"lycoris_" + k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
        network, _ = create_lycoris_from_weights(1.0, "", module, weights_sd=part)
        assert len(network.loras) == len({k.split(".")[0] for k in part}) > 0
        network.apply_to()
    return _out(comps["unet"], comps["text_encoder"], ids, x)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_rslora_with_patterns_loads_in_diffusers_and_kohya_readers_at_its_scale(method, tiny_base, tmp_path):
    pytest.importorskip("lycoris.wrapper")
    from personalize.adapters import read_lora
    from personalize.export import export_kohya
    from personalize.pipeline import build_pipeline
    from personalize.sources import load_components

    comps, run = _trained(method, tiny_base, tmp_path, rslora=True, **PATTERNS)
    ids, x = _inputs(comps)
    trained = _out(comps["unet"], comps["text_encoder"], ids, x)
    q = dict(comps["unet"].named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q.r["default"] == 2 and q.scaling["default"] == pytest.approx(8 / 2 ** 0.5)  # alpha/sqrt(r)

    pipe = build_pipeline(load_components(tiny_base, False))
    pipe.load_lora_weights(str(run))  # diffusers' own loader: the metadata carries use_rslora and the patterns
    torch.testing.assert_close(_out(pipe.unet, pipe.text_encoder, ids, x), trained, atol=1e-5, rtol=1e-5)

    layers = read_lora(run)  # rsLoRA folded into alpha: alpha/r of a plain LoRA is the same scale
    x_q = layers[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")]
    assert x_q.rank == 2 and x_q.alpha / x_q.rank == pytest.approx(8 / 2 ** 0.5)
    assert {x.rank for (c, m), x in layers.items() if c == "text_encoder" and "layers.1." in m} == {3}
    export_kohya(run, tmp_path / "k.safetensors")
    torch.testing.assert_close(_lycoris_out(tmp_path / "k.safetensors", tiny_base, ids, x), trained,
                               atol=1e-4, rtol=1e-4)


def test_patterns_fuse_right_in_the_merged_export(tiny_base, tmp_path):
    from personalize.export import export_merged
    from personalize.sources import load_components

    comps, run = _trained("lora", tiny_base, tmp_path, **PATTERNS)
    ids, x = _inputs(comps)
    export_merged(run, tmp_path / "m")
    merged = load_components(tmp_path / "m", False)
    torch.testing.assert_close(_out(merged["unet"], merged["text_encoder"], ids, x),
                               _out(comps["unet"], comps["text_encoder"], ids, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_patterns_of_lycoris_methods_reload_in_peft_and_export_per_module_alphas(method, tiny_base, tmp_path):
    pytest.importorskip("lycoris.wrapper")
    from peft import PeftModel
    from safetensors.torch import load_file

    from personalize.adapters import ADAPTER_DIR
    from personalize.export import export_kohya
    from personalize.sources import load_components

    comps, run = _trained(method, tiny_base, tmp_path, **PATTERNS)
    ids, x = _inputs(comps)
    trained = _out(comps["unet"], comps["text_encoder"], ids, x)
    fresh = load_components(tiny_base, False)
    unet = PeftModel.from_pretrained(fresh["unet"], str(run / ADAPTER_DIR / "unet"))
    te = PeftModel.from_pretrained(fresh["text_encoder"], str(run / ADAPTER_DIR / "text_encoder"))
    torch.testing.assert_close(_out(unet, te, ids, x), trained, atol=1e-5, rtol=1e-5)

    export_kohya(run, tmp_path / "k.safetensors")
    sd = load_file(str(tmp_path / "k.safetensors"))
    if method == "loha":  # each layer's own rank and alpha
        assert sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a"].shape[1] == 2
        assert float(sd["lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 2.5
    torch.testing.assert_close(_lycoris_out(tmp_path / "k.safetensors", tiny_base, ids, x), trained,
                               atol=1e-4, rtol=1e-4)


def test_every_method_is_registered_in_the_order_of_its_name():
    from personalize.adapters import ADAPTER_METHODS
    from personalize.defaults import ADAPTER_METHOD_NAMES, METHOD_LABELS

    assert list(ADAPTER_METHODS) == list(ADAPTER_METHOD_NAMES) and set(ADAPTER_METHOD_NAMES) < set(METHOD_LABELS)


def test_loraplus_puts_lora_b_at_the_ratio_of_the_lr(tiny_base):
    from personalize.adapters import add_adapter
    from personalize.config import TrainConfig
    from personalize.errors import UserError
    from personalize.fit import FitConfig, make_optimizer, trainable_parameters
    from personalize.sources import load_components

    comps = load_components(tiny_base, False)
    add_adapter(comps["unet"], comps["text_encoder"], _cfg("dora"))
    models = {"unet": comps["unet"], "text_encoder": comps["text_encoder"]}
    params = trainable_parameters(models)
    cfg = FitConfig(steps=1, lr=1e-4, optimizer="loraplus", loraplus_lr_ratio=16)
    opt = make_optimizer(list(params.values()), cfg, False, models=models)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert set(lr_of) == {id(p) for p in params.values()}  # every trainable parameter, once
    for name, p in params.items():
        b_side = "lora_B" in name or "magnitude" in name  # peft's grouping: B matrices and 1-D vectors
        assert lr_of[id(p)] == pytest.approx(16e-4 if b_side else 1e-4), name
    assert all(g["weight_decay"] == cfg.adam_weight_decay for g in opt.param_groups if g["params"] and g["lr"] != 1e-6)
    with pytest.raises(UserError, match="loraplus"):
        TrainConfig(method="loha", subject="dog", optimizer="loraplus").validate()


def _one_line(r):
    err = r.err.strip()
    assert r.code == 2 and "\n" not in err and "Traceback" not in err, r.err
    return err


def test_bad_method_options_are_one_line_and_write_nothing(photos, tmp_path, cli):
    def run(*args):
        return cli(*args, "--subject", photos, "--class-noun", "dog", "--output-dir", tmp_path / "r", *QUICK)

    assert "--rank-pattern nomatch" in _one_line(run("lora", "--rank-pattern", "nomatch=2"))
    assert "PATTERN=VALUE" in _one_line(run("lora", "--rank-pattern", "down_blocks.0.*"))
    assert "--hra-rank must be even" in _one_line(run("hra", "--hra-rank", "7"))
    assert "--optimizer loraplus" in _one_line(run("oft", "--optimizer", "loraplus"))
    assert "boft_block_num (5)" in _one_line(run("boft", "--boft-block-num", "5"))  # peft's reason, one line
    if not torch.cuda.is_available():
        assert "fbd_cuda" in _one_line(run("boft", "--boft-butterfly-factor", "2"))
    assert "use boft/hra" in _one_line(run("oft", "--oft-block-size", "8", "--lora-targets", "to_q,conv1"))
    assert "--rslora" in _one_line(run("loha", "--rslora"))  # not a LoHa flag
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_loraplus_run_resumes_exactly(photos, tmp_path, cli, monkeypatch):
    from safetensors.torch import load_file

    args = ["lora", "--subject", photos, "--class-noun", "dog", *QUICK, "--steps", "4", "--checkpoint-every", "2",
            "--optimizer", "loraplus"]
    assert cli(*args, "--output-dir", tmp_path / "a").code == 0
    whole_again = kill_after_checkpoint(monkeypatch, 2)
    assert cli(*args, "--output-dir", tmp_path / "b").code == 130
    whole_again()
    assert cli(*args, "--output-dir", tmp_path / "b", "--resume").code == 0
    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "run.json").read_text())["config"]["optimizer"] == "loraplus"
