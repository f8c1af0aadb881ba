"""Adapters go through peft's own API: no transformers (or diffusers model-mixin) `add_adapter`,
and the saved keys are exactly the diffusers layout `load_lora_weights` reads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from safetensors import safe_open


def _cfg(**kw):
    base = dict(seed=0, rank=4, lora_alpha=8, text_encoder_rank=4, text_encoder_alpha=4,
                lora_unet_targets=["to_q", "to_v"], lora_text_encoder_targets=["q_proj", "v_proj"],
                train_text_encoder=True)
    return SimpleNamespace(**(base | kw))


def _expected_keys(model, prefix, targets):
    """peft's key layout (`lora_A/lora_B`) for every targeted module, the one format diffusers'
    loader reads for any target set (diffusers' old `lora.down/up` renaming covered attention
    only, and a file with both formats lost its attention layers), derived from the model's own
    module names, not from our writer."""
    keys = set()
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            keys |= {f"{prefix}.{name}.lora_A.weight", f"{prefix}.{name}.lora_B.weight"}
    return keys


@pytest.mark.smoke
def test_attach_never_uses_the_model_mixins_add_adapter(tiny_base, tmp_path, monkeypatch):
    import diffusers.loaders.peft
    import transformers

    from personalize.adapters import LORA_WEIGHTS, add_lora, save_lora
    from personalize.sources import load_components

    def refuse(*a, **k):
        raise AssertionError("add_adapter of a model mixin was called")

    monkeypatch.setattr(transformers.PreTrainedModel, "add_adapter", refuse)
    monkeypatch.setattr(diffusers.loaders.peft.PeftAdapterMixin, "add_adapter", refuse)
    comps = load_components(tiny_base, False)
    unet, te = comps["unet"], comps["text_encoder"]
    add_lora(unet, te, _cfg())
    assert any(p.requires_grad for p in te.parameters()) and any(p.requires_grad for p in unet.parameters())
    save_lora(tmp_path, unet, te)
    with safe_open(str(tmp_path / LORA_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    # transformers 5 has no `text_model.` level in CLIPTextModel; diffusers' loader accepts both
    expected = (_expected_keys(unet, "unet", {"to_q", "to_v"})
                | _expected_keys(te, "text_encoder", {"q_proj", "v_proj"}))
    assert keys == expected and len(keys) > 8


def test_lora_config_rank_and_alpha_land_in_the_injected_layers(tiny_base):
    from personalize.adapters import add_lora
    from personalize.sources import load_components

    comps = load_components(tiny_base, False)
    add_lora(comps["unet"], comps["text_encoder"], _cfg(rank=3, lora_alpha=6, train_text_encoder=False))
    layer = next(m for n, m in comps["unet"].named_modules() if n.endswith("to_q"))
    assert layer.r["default"] == 3 and layer.scaling["default"] == pytest.approx(2.0)
    assert not getattr(comps["text_encoder"], "peft_config", None)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_uncast_lora_inputs_give_the_same_step_under_autocast(tiny_base, method):
    """Dropping peft's fp32 round trip of a LoRA layer's input under bf16 autocast changes no output
    and no gradient (DoRA keeps its own forward, untouched), and every layer is restored after."""
    import torch

    from personalize.adapters import add_adapter, lora_inputs_uncast
    from personalize.sources import load_components

    c = load_components(tiny_base, dtype=torch.bfloat16)
    add_adapter(c["unet"], c["text_encoder"], _cfg(method=method, lora_unet_targets=["to_q", "to_v", "proj_in"]))
    for p in c["unet"].parameters():
        if p.requires_grad:  # the trained weights are fp32 masters, as in a run
            p.data = torch.randn_like(p, dtype=torch.float32) * 0.1
    unet, layers = c["unet"], [m for m in c["unet"].modules() if hasattr(m, "lora_A")]
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size)
    emb = torch.randn(2, 8, unet.config.cross_attention_dim)

    def step():
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, torch.tensor([10, 500]), emb).sample
        out.float().square().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in unet.parameters() if p.requires_grad]

    plain = step()
    with lora_inputs_uncast([unet], autocast=True):
        skipped = [m for m in layers if getattr(m, "cast_input_dtype_enabled", True)]
        uncast = step()
    assert len(skipped) == (len(layers) if method == "dora" else 0)
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)
    assert len(plain) > 1 and all(torch.equal(a, b) for a, b in zip(plain, uncast))
