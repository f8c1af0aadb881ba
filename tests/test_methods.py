"""Every adapter method (LoRA, DoRA, LoHa, LoKr, OFT, BOFT, HRA), table-driven on the tiny backbone: a few
steps change the output; the saved adapter reloads through an independent reader (diffusers for
the LoRA-format methods, peft for the peft folders) and reproduces the in-memory output; merged ==
unmerged; the kohya/LyCORIS export, applied by the `lycoris-lora` package, gives the merged
weights; bad combinations are one line."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import FAST, kill_after_checkpoint
from personalize.defaults import ADAPTER_METHOD_NAMES

ADAPTERS = list(ADAPTER_METHOD_NAMES)
QUICK = [*FAST, "--class-images", "0", "--validation-images", "0", "--lr", "1e-2"]
GEN = ["-n", "1", "--steps", "2", "--resolution", "32"]


def _cfg(method, **kw):
    base = dict(method=method, seed=0, rank=4, lora_alpha=8, text_encoder_rank=4, text_encoder_alpha=4,
                lora_unet_targets=["to_q", "to_v"], lora_text_encoder_targets=["q_proj", "v_proj"],
                train_text_encoder=True, lokr_factor=-1, oft_block_size=8, boft_block_num=8, boft_butterfly_factor=1,
                hra_rank=8)
    return SimpleNamespace(**(base | kw))


def _inputs(comps):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, comps["tokenizer"].vocab_size, (1, comps["tokenizer"].model_max_length), generator=g)
    cfg = comps["unet"].config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    return ids, x


@torch.no_grad()
def _out(unet, te, ids, x):
    return unet(x, torch.tensor([10]), te(ids)[0]).sample


def _perturb(model, seed):
    """Stand-in for training: every adapter parameter moved off its identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if "magnitude" in n else 0.1 * noise)


@pytest.mark.parametrize("method", ADAPTERS)
def test_saved_adapter_reloads_exactly_through_an_independent_reader(method, tiny_base, tmp_path):
    from peft import PeftModel

    from personalize.adapters import ADAPTER_DIR, add_adapter, save_adapter
    from personalize.pipeline import build_pipeline
    from personalize.sources import load_components

    comps = load_components(tiny_base, False)
    ids, x = _inputs(comps)
    before = _out(comps["unet"], comps["text_encoder"], ids, x)
    add_adapter(comps["unet"], comps["text_encoder"], _cfg(method))
    _perturb(comps["unet"], 1)
    _perturb(comps["text_encoder"], 2)
    trained = _out(comps["unet"], comps["text_encoder"], ids, x)
    assert not torch.allclose(trained, before, atol=1e-4)
    written = save_adapter(tmp_path, method, comps["unet"], comps["text_encoder"])

    fresh = load_components(tiny_base, False)
    if method in ("lora", "dora"):
        pipe = build_pipeline(fresh)
        pipe.load_lora_weights(str(tmp_path))  # diffusers' own loader reads the file
        unet, te = pipe.unet, pipe.text_encoder
        if method == "dora":  # the magnitudes made it through
            assert any("lora_magnitude_vector" in n for n, _ in unet.named_parameters())
    else:
        assert written == [ADAPTER_DIR]
        unet = PeftModel.from_pretrained(fresh["unet"], str(tmp_path / ADAPTER_DIR / "unet"))
        te = PeftModel.from_pretrained(fresh["text_encoder"], str(tmp_path / ADAPTER_DIR / "text_encoder"))
    torch.testing.assert_close(_out(unet, te, ids, x), trained, atol=1e-5, rtol=1e-5)


def test_conv_and_feed_forward_targets_save_one_format_that_diffusers_applies_everywhere(tiny_base, tmp_path):
    """The mixed-format bug: conv / feed-forward targets must not leave the attention layers in a
    second key format that diffusers' loader skips with only a warning."""
    from safetensors import safe_open

    from personalize.adapters import LORA_WEIGHTS, add_adapter, save_adapter
    from personalize.pipeline import build_pipeline
    from personalize.sources import load_components

    targets = ["to_q", "to_v", "conv1", "conv2", "ff.net.0.proj", "ff.net.2"]
    comps = load_components(tiny_base, False)
    ids, x = _inputs(comps)
    add_adapter(comps["unet"], comps["text_encoder"], _cfg("lora", lora_unet_targets=targets,
                                                          lora_text_encoder_targets=["q_proj", "v_proj", "fc1"]))
    _perturb(comps["unet"], 3)
    _perturb(comps["text_encoder"], 4)
    trained = _out(comps["unet"], comps["text_encoder"], ids, x)
    wrapped = {n for n, m in comps["unet"].named_modules() if hasattr(m, "lora_A")}
    assert {t.split(".")[0] for t in targets} <= {n.split(".")[-1] if "ff" not in n else "ff" for n in wrapped} | {"ff"}
    save_adapter(tmp_path, "lora", comps["unet"], comps["text_encoder"])
    with safe_open(str(tmp_path / LORA_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

    pipe = build_pipeline(load_components(tiny_base, False))
    pipe.load_lora_weights(str(tmp_path))
    loaded = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert loaded == wrapped  # every targeted module, attention included
    torch.testing.assert_close(_out(pipe.unet, pipe.text_encoder, ids, x), trained, atol=1e-5, rtol=1e-5)


def test_merged_export_of_conv_and_feed_forward_lora_changes_every_targeted_weight(photos, tiny_base, tmp_path, cli):
    """Every targeted module is in the file and fused: merged W = W + alpha/r * up @ down (the
    mid block's self-attention to_q sees one token at this size, so its gradient, and delta, is 0)."""
    from safetensors.torch import load_file

    from personalize.adapters import read_lora

    targets = ["to_q", "to_v", "conv1", "conv2", "ff.net.0.proj", "ff.net.2"]
    run = tmp_path / "run"
    assert cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", run, *QUICK,
               "--lora-targets", ",".join(targets)).code == 0
    assert cli("export", run, "--format", "merged", "-o", tmp_path / "merged").code == 0
    base = load_file(str(tiny_base / "unet" / "diffusion_pytorch_model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors"))
    targeted = {k.removesuffix(".weight") for k in base if k.endswith(".weight")
                and any(k.removesuffix(".weight").endswith("." + t) for t in targets)}
    layers = {m: x for (c, m), x in read_lora(run).items() if c == "unet"}
    assert set(layers) == targeted and any(".conv1" in m for m in targeted) and any(".ff.net.2" in m for m in targeted)
    changed = 0
    for m, x in layers.items():
        w = base[m + ".weight"]
        delta = (x.up.flatten(1) @ x.down.flatten(1)).reshape(w.shape) * (x.alpha / x.rank)
        torch.testing.assert_close(merged[m + ".weight"], w + delta, atol=1e-5, rtol=1e-4)
        changed += bool(delta.abs().max() > 0) and not torch.equal(merged[m + ".weight"], w)
    assert changed >= len(layers) - 2


class _Runs(dict):
    """One trained run per method, trained when first asked for (a `-k boft` run trains only BOFT)."""

    def __init__(self, tmp_path_factory, photos):
        super().__init__()
        self.factory, self.photos = tmp_path_factory, photos

    def __missing__(self, m):
        from personalize.cli import main

        out = self.factory.mktemp("methods") / m
        assert main([m, "--subject", str(self.photos), "--class-noun", "dog", "--output-dir", str(out), *QUICK,
                     *(["--oft-block-size", "8"] if m == "oft" else [])]) == 0
        self[m] = out
        return out


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, photos):
    return _Runs(tmp_path_factory, photos)


@pytest.mark.parametrize("method", ADAPTERS)
def test_each_method_generates_and_merged_equals_unmerged(method, method_runs, tmp_path, cli):
    from personalize.sources import load_pipeline, resolve_source
    from personalize.sources import load_components

    run = method_runs[method]
    assert json.loads((run / "run.json").read_text())["method"] == method
    r = cli("generate", run, "--prompt", "a {token} dog", *GEN, "-o", tmp_path / "g")
    assert r.code == 0, r.err
    assert len(list((tmp_path / "g").glob("*.png"))) >= 1
    assert cli("export", run, "--format", "merged", "-o", tmp_path / "m").code == 0

    src = resolve_source(run)
    pipe = load_pipeline(src, torch.device("cpu"), torch.float32)
    merged = load_components(tmp_path / "m", False)
    plain = load_components(src.pipeline_dir, False)
    ids, x = _inputs(merged)
    unmerged = _out(pipe.unet, pipe.text_encoder, ids, x)
    torch.testing.assert_close(_out(merged["unet"], merged["text_encoder"], ids, x), unmerged, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_out(plain["unet"], plain["text_encoder"], ids, x), unmerged, atol=1e-4)

    # the single-file checkpoint fuses the adapter exactly as the merged export does
    from safetensors.torch import load_file

    from personalize.export.single_file import checkpoint_tensors

    r = cli("export", run, "--format", "single-file", "-o", tmp_path / "s.safetensors")
    assert r.code == 0, r.err
    want, _ = checkpoint_tensors(merged)
    got = load_file(tmp_path / "s.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ADAPTERS)
def test_kohya_lycoris_export_is_read_by_the_lycoris_package(method, method_runs, tmp_path, cli):
    """lycoris-lora's own kohya-network loader (what sd-scripts uses) applies the exported file;
    merged into a fresh base it gives our merged export's weights."""
    lycoris_wrapper = pytest.importorskip("lycoris.wrapper")
    from safetensors import safe_open
    from safetensors.torch import load_file

    from personalize.sources import resolve_source
    from personalize.sources import load_components

    run = method_runs[method]
    out = tmp_path / "k.safetensors"
    assert cli("export", run, "--format", "kohya", "-o", out).code == 0
    assert cli("export", run, "--format", "merged", "-o", tmp_path / "m").code == 0
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    marker = {"lora": ".lora_down.weight", "dora": ".dora_scale", "loha": ".hada_w1_a", "lokr": ".lokr_w1",
              "oft": ".diff", "boft": ".diff", "hra": ".diff"}[method]
    assert any(k.endswith(marker) for k in keys)

    comps = load_components(resolve_source(run).pipeline_dir, False)
    te_holder = torch.nn.Module()
    te_holder.text_model = comps["text_encoder"]  # kohya names the text encoder by CLIP's text_model. path
    if hasattr(comps["text_encoder"], "text_model"):
        te_holder = comps["text_encoder"]
    sd = load_file(str(out))
    networks = []
    for prefix, module in (("lora_unet_", comps["unet"]), ("lora_te_", te_holder)):
        # lycoris' generic loader names a module `lycoris_<dotted path with _>`, kohya's `lora_unet_`/`lora_te_`
        part = {"lycoris_" + k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
        network, _ = lycoris_wrapper.create_lycoris_from_weights(1.0, "", module, weights_sd=part)
        assert len(network.loras) == len({k.split(".")[0] for k in part}) > 0  # every layer found its module
        # its forward path (what inference runs); lycoris 4.1.3's merge_to applies LoHa's alpha/r twice
        network.apply_to()
        networks.append(network)
    merged = load_components(tmp_path / "m", False)
    ids, x = _inputs(merged)
    torch.testing.assert_close(_out(comps["unet"], comps["text_encoder"], ids, x),
                               _out(merged["unet"], merged["text_encoder"], ids, x), atol=1e-4, rtol=1e-4)


def _one_line(r):
    err = r.err.strip()
    assert r.code == 2 and "\n" not in err and "Traceback" not in err, r.err
    return err


def test_oft_block_size_that_does_not_divide_a_width_is_one_line_and_writes_nothing(photos, tmp_path, cli):
    r = cli("oft", "--subject", photos, "--class-noun", "dog", "--output-dir", tmp_path / "r", *QUICK,
            "--oft-block-size", "7")
    assert "oft" in _one_line(r)
    assert not (tmp_path / "r").exists()
    assert "--lokr-factor" in _one_line(cli("lokr", "--subject", photos, "--class-noun", "dog", *QUICK,
                                            "--lokr-factor", "0", "--output-dir", tmp_path / "k"))


def test_an_adapter_read_as_another_method_is_one_line(method_runs, tmp_path, cli):
    for real, claimed in (("loha", "lokr"), ("lora", "dora"), ("oft", "loha")):
        run = tmp_path / f"{real}-as-{claimed}"
        shutil.copytree(method_runs[real], run)
        doc = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps(doc | {"method": claimed}))
        err = _one_line(cli("generate", run, "--prompt", "x", *GEN, "-o", tmp_path / f"g-{real}"))
        assert "run.json says" in err or f"a {claimed} run without" in err, err


def test_mixing_rules_are_one_line(method_runs, tmp_path, cli):
    r = method_runs
    assert "cannot be mixed" in _one_line(cli("generate", r["lora"], "--adapter", r["loha"], "--prompt", "x", *GEN,
                                              "-o", tmp_path / "a"))
    assert "one adapter at weight and scale 1" in _one_line(
        cli("generate", r["oft"], "--adapter", r["oft"], "--prompt", "x", *GEN, "-o", tmp_path / "b"))
    assert "one adapter at weight and scale 1" in _one_line(
        cli("generate", r["oft"], "--lora-scale", "0.5", "--prompt", "x", *GEN, "-o", tmp_path / "c"))
    # LoRA with DoRA, and two LoHa at weights, do mix
    assert cli("generate", r["lora"], "--adapter", r["dora"], "--prompt", "x", *GEN, "-o", tmp_path / "d").code == 0
    assert cli("generate", r["loha"], "--adapter", r["loha"], "--adapter-weights", "0.5,0.5", "--prompt", "x", *GEN,
               "-o", tmp_path / "e").code == 0


@pytest.fixture(scope="module")
def other_arch(tiny_base, tmp_path_factory):
    from distill.cli import main

    out = tmp_path_factory.mktemp("bases") / "tiny-bk-tiny"
    assert main(["prune", "--teacher", str(tiny_base), "--arch", "bk-tiny", "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("method", ["loha", "lokr", "oft", "dora"])
def test_an_adapter_on_a_base_of_another_shape_is_one_line(method, method_runs, other_arch, tmp_path, cli):
    err = _one_line(cli("generate", method_runs[method], "--base", other_arch, "--prompt", "x", *GEN,
                        "-o", tmp_path / "g"))
    assert "trained on tiny" in err and "does not fit" in err
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "loha", "lokr", "oft"])
def test_resume_equals_uninterrupted(method, photos, tmp_path, cli, monkeypatch):
    from safetensors.torch import load_file

    args = [method, "--subject", photos, "--class-noun", "dog", *QUICK, "--steps", "4", "--checkpoint-every", "2"]
    assert cli(*args, "--output-dir", tmp_path / "a").code == 0
    whole_again = kill_after_checkpoint(monkeypatch, 2)
    assert cli(*args, "--output-dir", tmp_path / "b").code == 130
    whole_again()
    assert cli(*args, "--output-dir", tmp_path / "b", "--resume").code == 0
    files = (["pytorch_lora_weights.safetensors"] if method == "dora"
             else ["adapter/unet/adapter_model.safetensors", "adapter/text_encoder/adapter_model.safetensors"])
    for f in files:
        a, b = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.slow
def test_batch_runs_the_method_grid(dataset, tmp_path, cli):
    """`batch --methods` takes every method; each run lands in <base>/<method>/<subject> in its own
    format, from one in-memory base reset between methods."""
    out = tmp_path / "b"
    r = cli("batch", "--methods", "lora,loha,oft,boft,hra", "--subjects", "dog", "--data-dir", dataset, "--batch-dir", out,
            "--base", "tiny", "--steps", "2", "--class-images", "0", "--validation-images", "0", "--resolution", "32",
            "--log-every", "1")
    assert r.code == 0, r.err
    assert (out / "tiny" / "lora" / "dog" / "pytorch_lora_weights.safetensors").is_file()
    for m in ("loha", "oft", "boft", "hra"):
        assert (out / "tiny" / m / "dog" / "adapter" / "unet" / "adapter_model.safetensors").is_file()
        assert json.loads((out / "tiny" / m / "dog" / "run.json").read_text())["method"] == m
    assert "unknown method 'lorra'" in _one_line(cli("batch", "--methods", "lora,lorra", "--subjects", "dog",
                                                     "--data-dir", dataset, "--batch-dir", tmp_path / "c",
                                                     "--base", "tiny"))
