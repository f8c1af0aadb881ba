"""`export --format lora` (personalize/export/lora_extract.py): a run of every method, and a full
run, as a plain LoRA by a truncated SVD of each weight's change; a LoRA run resized. Read back by
diffusers' own `load_lora_weights` (and, exported on to kohya, by the `lycoris-lora` package): the
converted LoRA's outputs approach the run's as the rank grows and equal them at full rank."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_method_options import _fake_run, _lycoris_out
from test_methods import GEN, _cfg, _inputs, _out, _perturb

FULL_RANK = 10_000  # more than any weight's own rank: every singular value kept


def _run(method, tiny_base, tmp_path, bias=False):
    """A finished run of `method` made by hand: adapter (or, full, every Linear/Conv2d weight; with
    `bias` one bias too) moved off the base by a fixed random step."""
    from personalize.adapters import add_adapter, save_adapter
    from personalize.sources import load_components

    run = tmp_path / method
    comps = load_components(tiny_base, False)
    if method == "full":
        shutil.copytree(tiny_base, run)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for comp in ("unet", "text_encoder"):
                for name, m in comps[comp].named_modules():
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):  # a change of decaying spectrum, as training's
                        out, n = m.weight.shape[0], m.weight[0].numel()
                        d = sum(0.5 ** i * torch.outer(torch.randn(out, generator=g), torch.randn(n, generator=g))
                                for i in range(4))
                        m.weight.add_(0.05 * d.reshape(m.weight.shape) / n ** 0.5)
                comps[comp].save_pretrained(run / comp)
            if bias:
                comps["unet"].conv_in.bias.add_(1.0)
                comps["unet"].save_pretrained(run / "unet")
    else:
        run.mkdir()
        convs = ["conv1"] if method != "oft" else []  # peft's OFT on a 3x3 conv is refused (adapters.check_attach)
        add_adapter(comps["unet"], comps["text_encoder"], _cfg(method, lora_unet_targets=["to_q", "to_v", *convs]))
        _perturb(comps["unet"], 1)
        _perturb(comps["text_encoder"], 2)
        save_adapter(run, method, comps["unet"], comps["text_encoder"])
    _fake_run(run, method, tiny_base)
    return run


def _run_out(run, ids, x):
    from personalize.sources import load_components, load_pipeline, resolve_source

    src = resolve_source(run)
    if src.full_run is not None:
        comps = load_components(run, False)
        return _out(comps["unet"], comps["text_encoder"], ids, x)
    pipe = load_pipeline(src, torch.device("cpu"), torch.float32)
    return _out(pipe.unet, pipe.text_encoder, ids, x)


def _diffusers_out(lora_dir, tiny_base, ids, x):
    from personalize.pipeline import build_pipeline
    from personalize.sources import load_components

    pipe = build_pipeline(load_components(tiny_base, False))
    pipe.load_lora_weights(str(lora_dir))  # diffusers' own loader, per-module ranks from the file's metadata
    return _out(pipe.unet, pipe.text_encoder, ids, x)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", ["lora", "oft", *(pytest.param(m, marks=SLOW) for m in
                                                       ("dora", "loha", "lokr", "boft", "hra", "full"))])
def test_a_run_as_a_lora_approaches_it_as_the_rank_grows_and_is_exact_at_full_rank(method, tiny_base, tmp_path):
    from personalize.export.lora_extract import export_lora
    from personalize.sources import load_components

    run = _run(method, tiny_base, tmp_path)
    base = load_components(tiny_base, False)
    ids, x = _inputs(base)
    plain, want = _out(base["unet"], base["text_encoder"], ids, x), _run_out(run, ids, x)
    out_err, weight_err = [], []
    for k in (1, 2, FULL_RANK):  # 2: below every module's own rank (a LoRA run's is 4)
        r = export_lora(run, tmp_path / f"r{k}", rank=k)
        got = _diffusers_out(tmp_path / f"r{k}", tiny_base, ids, x)
        out_err.append(float((got - want).norm() / (plain - want).norm()))
        weight_err.append(r.report["relative_error"])
        assert json.loads((tmp_path / f"r{k}" / "export.json").read_text())["format"] == "lora"
        assert all(m["rank"] <= k for m in r.report["modules"].values())
    assert weight_err[0] > weight_err[1] > weight_err[2] and weight_err[2] < 1e-5, weight_err
    assert out_err[0] > out_err[1] > out_err[2] and out_err[2] < 1e-4, out_err
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_what_a_lora_cannot_carry_is_reported(tiny_base, tmp_path):
    from personalize.export.lora_extract import export_lora

    r = export_lora(_run("full", tiny_base, tmp_path, bias=True), tmp_path / "l", rank=2)
    assert r.report["not_carried"]["parameters"] == 1 and "no LoRA carries" in r.summary()
    assert any(m.startswith("unet.conv_in") for m in r.report["modules"])  # the 3x3 conv itself is carried


def test_the_converted_lora_exports_to_kohya_and_the_lycoris_package_applies_it(tiny_base, tmp_path):
    pytest.importorskip("lycoris.wrapper")
    from personalize.export import export_kohya
    from personalize.export.lora_extract import export_lora
    from personalize.sources import load_components

    run = _run("oft", tiny_base, tmp_path)
    ids, x = _inputs(load_components(tiny_base, False))
    export_lora(run, tmp_path / "l", rank=FULL_RANK)
    export_kohya(tmp_path / "l", tmp_path / "k.safetensors")
    torch.testing.assert_close(_lycoris_out(tmp_path / "k.safetensors", tiny_base, ids, x), _run_out(run, ids, x),
                               atol=1e-4, rtol=1e-4)


def test_resizing_a_lora_keeps_the_best_approximation_of_each_b_a(tiny_base, tmp_path, cli):
    """kohya's resize_lora: the SVD of each (alpha/r) B A, cut at --rank or at --energy."""
    from personalize.adapters import read_lora

    run = _run("lora", tiny_base, tmp_path)
    before = read_lora(run)
    r = cli("export", run, "--format", "lora", "--rank", "2", "-o", tmp_path / "r2")
    assert r.code == 0, r.err
    assert "relative error" in r.out
    r = cli("export", run, "--format", "lora", "--energy", "0.9", "-o", tmp_path / "e")
    assert r.code == 0, r.err
    for out, rank, energy in ((tmp_path / "r2", 2, None), (tmp_path / "e", None, 0.9)):
        after = read_lora(out)
        report = json.loads((out / "export.json").read_text())["modules"]
        assert set(after) == set(before)
        for key, x in before.items():
            m = (x.up.flatten(1) @ x.down.flatten(1)) * (x.alpha / x.rank)
            s = torch.linalg.svdvals(m)
            e = s.square().cumsum(0) / s.square().sum()
            k = rank or int((e < energy).sum()) + 1  # the smallest rank keeping the energy
            y = after[key]
            assert y.rank == k and y.down.shape[1:] == x.down.shape[1:], key
            got = (y.up.flatten(1) @ y.down.flatten(1)) * (y.alpha / y.rank)
            best = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())  # Eckart-Young
            assert float((m - got).norm() / m.norm()) == pytest.approx(best, abs=1e-5)
            assert report[f"{key[0]}.{key[1]}"]["relative_error"] == pytest.approx(best, abs=1e-5)
    # the output is a LoRA run: generate takes it
    r = cli("generate", tmp_path / "e", "--prompt", "a {token} dog", *GEN, "-o", tmp_path / "g")
    assert r.code == 0, r.err
    assert "--rank: only for --format lora" in cli("export", run, "--format", "kohya", "--rank", "2",
                                                   "-o", tmp_path / "k.safetensors").err
