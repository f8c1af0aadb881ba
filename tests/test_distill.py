"""distill/: BK-SDM block removal + knowledge distillation, on tiny teachers built in code and on
the real SD-v1.4 / SD-v2.1-base U-Net configs (meta device: counts without weights)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import write_photos
from distill.kd import Distiller, FeatureCapture, KDWeights, feature_pairs
from distill.mapping import MappingError, check_coverage, init_student_from_teacher, shapes, weight_mapping
from personalize.architectures import (
    ARCHS, SD_V1_UNET_CONFIG, SD_V2_BASE_UNET_CONFIG, build_unet, count_macs, count_params, student_config,
)

STUDENT_ARCHS = ["bk-base", "bk-small", "bk-tiny"]


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two busy-waiting
    OpenMP pools make every op many times slower; restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    from personalize.backbones import build_tiny_components

    return build_tiny_components(seed=0)


@pytest.fixture(scope="module")
def teacher_unet(tiny):
    return tiny["unet"].eval()


@pytest.fixture(scope="module")
def tcfg(teacher_unet) -> dict:
    return dict(teacher_unet.config)


@pytest.fixture(scope="module")
def teacher_dir(tiny, tmp_path_factory) -> Path:
    from diffusers import StableDiffusionPipeline

    out = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    StableDiffusionPipeline(**tiny, requires_safety_checker=False).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory) -> Path:
    root = write_photos(tmp_path_factory.mktemp("kd-data") / "pairs", n=4, size=(72, 80), seed=3)
    with (root / "metadata.jsonl").open("w") as f:
        for i, p in enumerate(sorted(root.glob("*.jpg"))):
            f.write(json.dumps({"file_name": p.name, "text": f"a photo of thing {i}"}) + "\n")
    return root


@pytest.fixture
def distill_cli(capsys):
    from distill.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        cap = capsys.readouterr()
        return code, cap.out, cap.err

    return run


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    emb = torch.randn(batch, 77, c.cross_attention_dim, generator=g)
    return x, emb


# ---------------------------------------------------------------------------- architecture + mapping
def test_student_configs_follow_the_bk_recipe(tcfg):
    base, small, tiny_ = (student_config(tcfg, ARCHS[a]) for a in STUDENT_ARCHS)
    assert tcfg["layers_per_block"] == 2 and tcfg["mid_block_type"] is not None
    assert base["layers_per_block"] == 1 and base["mid_block_type"] == tcfg["mid_block_type"]
    assert list(base["block_out_channels"]) == list(tcfg["block_out_channels"])
    assert small["layers_per_block"] == 1 and small["mid_block_type"] is None
    assert tiny_["mid_block_type"] is None
    assert list(tiny_["block_out_channels"]) == [32, 32, 64]
    assert list(tiny_["down_block_types"]) == ["CrossAttnDownBlock2D"] * 3
    assert list(tiny_["up_block_types"]) == ["CrossAttnUpBlock2D"] * 3
    full = student_config(tcfg, ARCHS["full"])
    assert {k: v for k, v in full.items() if not k.startswith("_")} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in tcfg.items() if not k.startswith("_")}


@pytest.mark.parametrize("arch", [*STUDENT_ARCHS, "full"])
def test_mapping_covers_every_student_tensor_once_with_matching_shapes(tcfg, teacher_unet, arch):
    student = build_unet(student_config(tcfg, ARCHS[arch]))
    mapping = weight_mapping(tcfg, ARCHS[arch])
    cov = check_coverage(mapping, shapes(student), shapes(teacher_unet))
    assert set(cov.key_map) == set(student.state_dict())
    ssd, tsd = student.state_dict(), teacher_unet.state_dict()
    for sk, tk in cov.key_map.items():
        assert tuple(ssd[sk].shape) == tuple(tsd[tk].shape)
    assert len(set(cov.key_map.values())) == len(cov.key_map)  # no teacher tensor used twice
    if arch == "full":
        assert all(k == v for k, v in cov.key_map.items()) and not cov.unused_teacher_keys
    else:
        assert cov.unused_teacher_keys


def test_coverage_check_rejects_holes_overlaps_and_shape_mismatches(tcfg, teacher_unet):
    arch = ARCHS["bk-small"]
    s, t = shapes(build_unet(student_config(tcfg, arch))), shapes(teacher_unet)
    m = weight_mapping(tcfg, arch)
    hole = dict(m)
    del hole["up_blocks.1.resnets.1."]
    with pytest.raises(MappingError, match="not covered"):
        check_coverage(hole, s, t)
    with pytest.raises(MappingError, match="covered 2 times"):
        check_coverage({**m, "up_blocks.1.": "up_blocks.1."}, s, t)
    wrong = {**m, "up_blocks.1.resnets.1.": "up_blocks.1.resnets.1."}  # 2nd teacher pair: wrong skip width
    with pytest.raises(MappingError, match="shape mismatch"):
        check_coverage(wrong, s, t)
    with pytest.raises(MappingError, match="covers no student tensor"):
        check_coverage({**m, "mid_block.": "mid_block."}, s, t)


def _equal(student, teacher, s_prefix, t_prefix) -> bool:
    ssd, tsd = student.state_dict(), teacher.state_dict()
    keys = [k for k in ssd if k.startswith(s_prefix)]
    assert keys, s_prefix
    return all(torch.equal(ssd[k], tsd[t_prefix + k[len(s_prefix):]]) for k in keys)


@pytest.mark.parametrize("arch", STUDENT_ARCHS)
def test_init_copies_the_right_teacher_tensors(teacher_unet, arch):
    student, _ = init_student_from_teacher(teacher_unet, ARCHS[arch])
    assert not any(p.is_meta for p in student.parameters())
    # one residual+attention pair per down stage, two per up stage
    assert [len(b.resnets) for b in student.down_blocks] == [1] * len(student.down_blocks)
    assert [len(b.resnets) for b in student.up_blocks] == [2] * len(student.up_blocks)
    for i in range(len(student.down_blocks)):  # down stages keep the teacher's first pair
        assert _equal(student, teacher_unet, f"down_blocks.{i}.resnets.0.", f"down_blocks.{i}.resnets.0.")
    off = 1 if arch == "bk-tiny" else 0
    for i in range(len(student.up_blocks)):  # up stages: teacher pairs 1 and 3
        ti = i + off
        assert _equal(student, teacher_unet, f"up_blocks.{i}.resnets.0.", f"up_blocks.{ti}.resnets.0.")
        assert _equal(student, teacher_unet, f"up_blocks.{i}.resnets.1.", f"up_blocks.{ti}.resnets.2.")
        if hasattr(student.up_blocks[i], "attentions"):
            assert _equal(student, teacher_unet, f"up_blocks.{i}.attentions.1.", f"up_blocks.{ti}.attentions.2.")
    if arch == "bk-tiny":
        assert student.down_blocks[2].downsamplers is None and student.mid_block is None
    if arch == "bk-base":
        assert _equal(student, teacher_unet, "mid_block.", "mid_block.")
    # the student owns its tensors: training it must not touch the teacher
    p = next(student.parameters())
    assert p.data_ptr() != next(teacher_unet.parameters()).data_ptr()


# ---------------------------------------------------------------------------- KD loss + hooks
def test_kd_loss_is_exactly_zero_for_the_teachers_full_copy(teacher_unet, tcfg, tiny):
    student, _ = init_student_from_teacher(teacher_unet, ARCHS["full"])
    pairs = feature_pairs(tcfg, dict(student.config))
    assert len(pairs) == 8 and all(p.student == p.teacher for p in pairs)
    d = Distiller(student, copy.deepcopy(teacher_unet), tiny["scheduler"], pairs, KDWeights())
    x, emb = _inputs(teacher_unet)
    out = d(student, x, emb, torch.Generator().manual_seed(0))
    assert not d.student_feats.features and not d.teacher_feats.features  # activations not pinned between steps
    d.remove_hooks()
    assert out["loss_kd_out"].item() == 0.0 and out["loss_kd_feat"].item() == 0.0
    assert out["loss_sd"].item() > 0 and torch.equal(out["loss"], out["loss_sd"])


def test_kd_loss_is_positive_for_a_pruned_student(teacher_unet, tcfg, tiny):
    student, _ = init_student_from_teacher(teacher_unet, ARCHS["bk-small"])
    teacher = copy.deepcopy(teacher_unet).train().requires_grad_(True)  # as a caller might hand it over
    d = Distiller(student, teacher, tiny["scheduler"], feature_pairs(tcfg, dict(student.config)),
                  KDWeights(lambda_sd=0.0, lambda_kd_out=2.0, lambda_kd_feat=3.0))
    x, emb = _inputs(teacher_unet)
    out = d(student, x, emb, torch.Generator().manual_seed(0))
    d.remove_hooks()
    assert out["loss_kd_out"] > 0 and out["loss_kd_feat"] > 0
    torch.testing.assert_close(out["loss"], 2 * out["loss_kd_out"] + 3 * out["loss_kd_feat"])
    # the teacher runs frozen: eval mode (no dropout), no parameter asks for a gradient
    assert out["loss"].requires_grad and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out["loss"].backward()  # the gradient reaches the student only
    assert all(p.grad is None for p in teacher.parameters())
    assert student.conv_in.weight.grad is not None and student.up_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_keeps_the_kd_gradients(teacher_unet, tcfg, tiny):
    # the hooks fire again when checkpointed blocks are recomputed in the backward pass; the loss
    # and its gradient must not notice
    grads = []
    for checkpointing in (False, True):
        student, _ = init_student_from_teacher(teacher_unet, ARCHS["bk-small"])
        student.train()
        if checkpointing:
            student.enable_gradient_checkpointing()
        d = Distiller(student, teacher_unet, tiny["scheduler"], feature_pairs(tcfg, dict(student.config)), KDWeights())
        x, emb = _inputs(teacher_unet)
        out = d(student, x, emb, torch.Generator().manual_seed(0))
        out["loss"].backward()
        d.remove_hooks()
        grads.append((out["loss"].detach(), [p.grad.clone() for p in student.parameters()]))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l0, l1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_feature_pairs_refuse_a_student_of_another_teacher(tcfg):
    other = student_config({**tcfg, "cross_attention_dim": 2 * tcfg["cross_attention_dim"]}, ARCHS["bk-small"])
    with pytest.raises(ValueError, match="cross_attention_dim"):
        feature_pairs(tcfg, other)
    wider = student_config({**tcfg, "block_out_channels": [2 * c for c in tcfg["block_out_channels"]]},
                           ARCHS["bk-small"])
    with pytest.raises(ValueError, match="widths"):
        feature_pairs(tcfg, wider)


def test_feature_pairs_of_bk_tiny_skip_the_removed_stage(tcfg):
    pairs = feature_pairs(tcfg, student_config(tcfg, ARCHS["bk-tiny"]))
    assert [(p.student, p.teacher) for p in pairs] == [
        ("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.0.proj_out", "down_blocks.2.attentions.1.proj_out"),
        ("up_blocks.0", "up_blocks.1"), ("up_blocks.1", "up_blocks.2"), ("up_blocks.2", "up_blocks.3"),
    ]
    base = feature_pairs(tcfg, student_config(tcfg, ARCHS["bk-base"]))
    assert [p.student for p in base] == [f"down_blocks.{i}" for i in range(4)] + [f"up_blocks.{i}" for i in range(4)]


@pytest.mark.parametrize("arch", ["bk-small", "bk-tiny"])
def test_hooks_capture_the_named_layers_with_matching_shapes(teacher_unet, tcfg, arch):
    student, _ = init_student_from_teacher(teacher_unet, ARCHS[arch])
    pairs = feature_pairs(tcfg, dict(student.config))
    x, emb = _inputs(teacher_unet, batch=1)
    t = torch.tensor([10])
    with FeatureCapture(student, [p.student for p in pairs]) as sc, \
            FeatureCapture(teacher_unet, [p.teacher for p in pairs]) as tc, torch.no_grad():
        student(x, t, emb)
        teacher_unet(x, t, emb)
        assert set(sc.features) == {p.student for p in pairs} and set(tc.features) == {p.teacher for p in pairs}
        for p in pairs:
            assert sc[p.student].shape == tc[p.teacher].shape, p
        side = x.shape[-1]
        assert tuple(sc["down_blocks.0"].shape) == (1, 32, side // 2, side // 2)  # hidden after the downsampler
        assert tuple(sc["up_blocks.0"].shape)[1] == 64
    n_hooks = sum(len(m._forward_hooks) for m in student.modules())
    assert n_hooks == 0  # the context manager removed them
    with pytest.raises(ValueError, match="no such module"):
        FeatureCapture(student, ["mid_block" if arch != "bk-base" else "nope"])


def test_a_few_kd_steps_bring_the_student_closer_to_the_teacher(teacher_unet, tcfg, tiny, tmp_path):
    from personalize.fit import FitConfig, fit, make_accelerator

    student, _ = init_student_from_teacher(teacher_unet, ARCHS["bk-tiny"])
    # the random-weight teacher does not denoise, so the task loss would pull the student away
    # from it: measure the two KD terms alone
    d = Distiller(student, teacher_unet, tiny["scheduler"], feature_pairs(tcfg, dict(student.config)),
                  KDWeights(lambda_sd=0.0))
    latents, emb = _inputs(teacher_unet, batch=2, seed=1)
    x_eval, _ = _inputs(teacher_unet, batch=2, seed=2)
    t_eval = torch.tensor([100, 700])

    def out_mse():
        with torch.no_grad():
            return torch.mean((student(x_eval, t_eval, emb).sample - teacher_unet(x_eval, t_eval, emb).sample) ** 2).item()

    before = out_mse()
    fit(make_accelerator("no", 1, None), {"unet": student}, lambda ms, s, m, g: d(ms["unet"], latents, emb, g),
        FitConfig(steps=8, lr=1e-3, log_every=4), tmp_path, log=lambda *a: None)
    d.remove_hooks()
    student.eval()
    after = out_mse()
    assert after < 0.6 * before, (before, after)
    header = (tmp_path / "logs" / "loss.csv").read_text().splitlines()[0]
    assert header == "step,loss,loss_sd,loss_kd_out,loss_kd_feat"


# ---------------------------------------------------------------------------- real SD configs
# U-Net parameter counts measured with diffusers 0.42 (meta device). SD-v1.4 students match the
# BK-SDM model card (0.58B / 0.49B / 0.33B); the v2 ones match the nota-ai/bk-sdm-v2-* U-Nets.
REAL_COUNTS = {
    "v1": (SD_V1_UNET_CONFIG, 859.52, {"bk-base": 579.38, "bk-small": 482.35, "bk-tiny": 323.38}),
    "v2": (SD_V2_BASE_UNET_CONFIG, 865.91, {"bk-base": 583.48, "bk-small": 485.79, "bk-tiny": 326.83}),
}


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_real_sd_param_counts_match_the_model_cards(family):
    cfg, teacher_m, students = REAL_COUNTS[family]
    teacher = build_unet(cfg)
    assert abs(sum(p.numel() for p in teacher.parameters()) / 1e6 - teacher_m) < 0.05
    for arch, m in students.items():
        scfg = student_config(cfg, ARCHS[arch])
        assert abs(count_params(scfg) / 1e6 - m) < 0.05, arch
        check_coverage(weight_mapping(cfg, ARCHS[arch]), shapes(build_unet(scfg)), shapes(teacher))


@pytest.fixture(scope="module")
def real_macs() -> dict:
    """MACs per step at 512 px of every (family, arch), measured once (meta-device forward, ~0.6 s each)."""
    return {(fam, a): count_macs(student_config(cfg, ARCHS[a]))
            for fam, (cfg, _, _) in REAL_COUNTS.items() for a in ["full", *STUDENT_ARCHS]}


def test_real_sd_v1_macs_match_the_paper(real_macs):
    # BK-SDM paper, Table 1 (thop, conv+linear): 339G / 224G / 218G / 205G per step at 512 px
    paper = {"full": 339, "bk-base": 224, "bk-small": 218, "bk-tiny": 205}
    for a, g in paper.items():
        assert abs(real_macs["v1", a].conv_linear / 1e9 - g) < 0.6, (a, real_macs["v1", a])
    assert real_macs["v1", "full"].attention > real_macs["v1", "bk-base"].attention > 0


def test_readme_table_holds_the_numbers_the_code_measures(real_macs):
    readme = (Path(__file__).resolve().parents[1] / "distill" / "README.md").read_text()
    family = {"SD-v1.4": "v1", "SD-v2.1-base": "v2"}
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in readme.splitlines()
            if line.startswith("| SD-")]
    assert len(rows) == 8
    for teacher, arch, params, conv_linear, attention, total in rows:
        fam, a = family[teacher], "full" if arch == "teacher" else arch
        cfg = student_config(REAL_COUNTS[fam][0], ARCHS[a])
        m = real_macs[fam, a]
        assert params == f"{count_params(cfg) / 1e6:.1f}M", (teacher, arch)
        assert [conv_linear, attention, total] == [
            f"{v / 1e9:.1f}G" for v in (m.conv_linear, m.attention, m.total)], (teacher, arch)


# ---------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def pruned_tiny(teacher_dir, tmp_path_factory) -> Path:
    from distill.cli import main

    out = tmp_path_factory.mktemp("students") / "bk-tiny"
    assert main(["prune", "--teacher", str(teacher_dir), "--arch", "bk-tiny", "-o", str(out)]) == 0
    return out


def test_prune_writes_a_loadable_safetensors_pipeline(pruned_tiny, teacher_unet):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pruned_tiny)
    assert list(pipe.unet.config.block_out_channels) == [32, 32, 64] and pipe.unet.mid_block is None
    assert torch.equal(pipe.unet.up_blocks[0].resnets[1].conv1.weight, teacher_unet.up_blocks[1].resnets[2].conv1.weight)
    files = [p for p in pruned_tiny.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".ckpt", ".pt"}]
    assert {"vae", "text_encoder", "tokenizer", "scheduler", "unet"} <= {p.name for p in pruned_tiny.iterdir()}
    meta = json.loads((pruned_tiny / "distill.json").read_text())
    assert meta["arch"]["name"] == "bk-tiny" and meta["weight_mapping"]["up_blocks.0.resnets.1."] == "up_blocks.1.resnets.2."
    assert not [p for p in pruned_tiny.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    g = torch.Generator().manual_seed(0)
    img = pipe("a photo", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


def test_prune_dry_run_prints_counts_and_macs(distill_cli, real_macs):
    code, out, _ = distill_cli("prune", "--teacher", "sd-v1.4", "--arch", "bk-small", "--dry-run")
    assert code == 0 and "512px" in out
    teacher_line, student_line = out.strip().splitlines()[-2:]
    for line, a in ((teacher_line, "full"), (student_line, "bk-small")):
        macs, params = real_macs["v1", a], count_params(student_config(SD_V1_UNET_CONFIG, ARCHS[a]))
        assert f"{params / 1e6:.1f}M params" in line, line  # pinned to the model cards above
        assert f"{macs.conv_linear / 1e9:.1f}G conv+linear" in line, line
        assert line.split("=")[1].split()[0] == f"{macs.total / 1e9:.1f}G", line


@pytest.mark.parametrize("source", ["dir", "registry"])
def test_prune_dry_run_of_a_teacher_dir_or_registry_name_writes_nothing(source, distill_cli, teacher_dir, tcfg, tmp_path):
    teacher = teacher_dir if source == "dir" else "tiny"  # registry name of the same in-code backbone
    code, out, _ = distill_cli("prune", "--teacher", teacher, "--arch", "bk-tiny", "--dry-run",
                               "--resolution", "64", "-o", tmp_path / "never")
    assert code == 0 and not (tmp_path / "never").exists()
    teacher_line, student_line = out.strip().splitlines()[-2:]
    assert teacher_line.startswith("teacher") and student_line.startswith("bk-tiny")
    assert f"{count_params(student_config(tcfg, ARCHS['bk-tiny'])) / 1e6:.1f}M" in student_line


def test_every_flag_has_help_text(capsys):
    import argparse

    from distill.cli import build_parser, main

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {"prune", "train", "eval", "report"}
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings)
    assert main(["train", "--help"]) == 0 and "--lambda-kd-feat" in capsys.readouterr().out


def _train_parser():
    import argparse

    from distill.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["train"]


# every spelling `distill train` has always had (the generated flags add only the --no-X of booleans)
TRAIN_FLAGS = {
    "--teacher", "--student", "--data", "-o", "--output", "--split", "--image-column", "--caption-column",
    "--streaming", "--shuffle-buffer", "--max-samples", "--resolution", "--random-crop", "--no-flip", "--precompute",
    "--steps", "--lr", "--batch-size", "--gradient-accumulation-steps", "--mixed-precision",
    "--gradient-checkpointing", "--lambda-sd", "--lambda-kd-out", "--lambda-kd-feat", "--seed", "--checkpoint-every",
    "--log-every", "--allow-pickle", "--resume", "--use-ema", "--ema-decay", "--valid-steps", "--valid-prompt",
    "--num-valid-images",
}


def test_train_flags_are_the_config_fields(distill_cli, capsys, tmp_path):
    import dataclasses

    from distill.cli import train_config
    from distill.train_data.sources import DataSpec
    from distill.config import DistillConfig, KDWeights

    p = _train_parser()
    dests = {a.dest for a in p._actions} - {"help"}
    fields = {f.name for cls in (DistillConfig, DataSpec, KDWeights) for f in dataclasses.fields(cls)}
    # the documented exceptions: `data` and `kd` hold dataclasses (whose fields are the flags);
    # max_grad_norm has no flag (kd_train.sh's 1.0)
    assert dests == fields - {"data", "kd", "max_grad_norm"}
    flags = {s for a in p._actions for s in a.option_strings} - {"-h", "--help"}
    assert TRAIN_FLAGS <= flags
    assert all(f in TRAIN_FLAGS or f.startswith("--no-") and "--" + f[5:] in TRAIN_FLAGS for f in flags), flags

    # no flags: the dataclass defaults; the flags that turn a default off, off
    required = ["--teacher", "t", "--student", "s", "--data", "d", "-o", "o"]
    assert train_config(p.parse_args(required)) == DistillConfig("t", "s", "o", data=DataSpec("d"))
    cfg = train_config(p.parse_args(required + ["--random-crop", "--no-flip", "--streaming", "--resume",
                                                "--mixed-precision", "bf16", "--lambda-kd-out", "0.5"]))
    assert (cfg.data.center_crop, cfg.data.random_flip, cfg.data.streaming, cfg.resume) == (False, False, True, True)
    assert (cfg.mixed_precision, cfg.kd, cfg.max_grad_norm) == ("bf16", KDWeights(lambda_kd_out=0.5), 1.0)
    with pytest.raises(SystemExit) as e:  # choices are argparse's
        p.parse_args(required + ["--mixed-precision", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err

    # a bad value: one line naming the flag, exit 2, nothing written
    code, _, err = distill_cli("train", "--teacher", "t", "--student", "s", "--data", "d", "-o", tmp_path / "run",
                               "--batch-size", "0")
    assert code == 2 and err.strip().splitlines() == ["error: --batch-size must be >= 1"]
    assert not (tmp_path / "run").exists()


def test_eval_flags_are_the_config_fields():
    import argparse
    import dataclasses

    from distill.benchmark import EvalConfig
    from distill.cli import build_parser, train_config
    from distill.coco import GenerationConfig

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    p = sub.choices["eval"]
    fields = {f.name for cls in (EvalConfig, GenerationConfig) for f in dataclasses.fields(cls)}
    assert {a.dest for a in p._actions} - {"help"} == fields - {"generation"}
    cfg = train_config(p.parse_args(["--base", "tiny", "-o", "o", "--steps", "3", "--limit", "5", "--no-score"]),
                       EvalConfig)
    assert cfg == EvalConfig("tiny", "o", generation=GenerationConfig(steps=3), limit=5, score=False)
    # BK-SDM generate.py's protocol by default
    assert (GenerationConfig().steps, GenerationConfig().guidance_scale, GenerationConfig().resolution,
            GenerationConfig().resize, GenerationConfig().scheduler) == (25, 7.5, 512, 256, "pndm")


@pytest.mark.parametrize("args,msg", [
    (["prune", "--teacher", "sd-v1.4", "--arch", "bk-huge", "--dry-run"], "unknown arch 'bk-huge'"),
    (["prune", "--teacher", "sd-v1.4", "--arch", "bk-small", "--dry-run", "--resolution", "500"], "multiple of 8"),
    (["prune", "--teacher", "/nonexistent/teacher", "--arch", "bk-small", "-o", "/tmp/never"], "no such directory"),
    (["prune", "--teacher", "sd-v1.4", "--arch", "bk-small", "-o", "/tmp/never"], "HF_HUB_OFFLINE"),
    (["prune", "--teacher", "no-such-model", "--arch", "bk-small", "--dry-run"], "unknown base"),
])
def test_prune_bad_inputs_give_one_line_and_exit_2(distill_cli, args, msg):
    code, _, err = distill_cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err and err.startswith("error: ")


def test_prune_refuses_an_occupied_output_before_loading(distill_cli, teacher_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = distill_cli("prune", "--teacher", teacher_dir, "--arch", "bk-tiny", "-o", afile)
    assert code == 2 and "not a directory" in err and afile.read_text() == "mine"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, _, err = distill_cli("prune", "--teacher", teacher_dir, "--arch", "bk-tiny", "-o", full)
    assert code == 2 and "--overwrite" in err and (full / "keep.txt").read_text() == "mine"


def test_pickled_teacher_weights_are_refused_unless_allowed(distill_cli, teacher_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-teacher"
    shutil.copytree(teacher_dir, pickled)
    st = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), st.with_suffix(".bin"))
    st.unlink()
    code, _, err = distill_cli("prune", "--teacher", pickled, "--arch", "bk-tiny", "-o", tmp_path / "s")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--allow-pickle" in err
    assert not (tmp_path / "s").exists()
    code, _, err = distill_cli("prune", "--teacher", pickled, "--arch", "bk-tiny", "-o", tmp_path / "s",
                               "--allow-pickle")
    assert code == 0, err
    assert (tmp_path / "s" / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # written as safetensors


def test_a_failed_save_leaves_the_output_as_it_was(tmp_path):
    from distill.prune import save_pipeline_atomic

    class DiesHalfway:
        def save_pretrained(self, d, **_):
            (Path(d) / "unet").mkdir()
            (Path(d) / "unet" / "part.safetensors").write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_pipeline_atomic(DiesHalfway(), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp dir
    old = tmp_path / "old"
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    with pytest.raises(OSError):
        save_pipeline_atomic(DiesHalfway(), old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "model_index.json").read_text() == "{}"


def test_train_bad_inputs_give_one_line_and_exit_2(distill_cli, teacher_dir, pruned_tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = distill_cli("train", "--teacher", teacher_dir, "--student", pruned_tiny, "--data", empty,
                               "-o", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no image files" in err
    nocap = write_photos(tmp_path / "nocap", n=2)
    code, _, err = distill_cli("train", "--teacher", teacher_dir, "--student", pruned_tiny, "--data", nocap,
                               "-o", tmp_path / "run")
    assert code == 2 and "no captions" in err
    code, _, err = distill_cli("train", "--teacher", teacher_dir, "--student", tmp_path, "--data", nocap,
                               "-o", tmp_path / "run")
    assert code == 2 and "not a pipeline directory" in err
    ok = ["train", "--teacher", teacher_dir, "--student", pruned_tiny, "--data", nocap, "-o", tmp_path / "run"]
    for extra, msg in [(["--data", tmp_path / "missing"], "no such folder"),
                       (["--lambda-kd-feat", "-1"], "--lambda-kd-feat must be >= 0"),
                       (["--resolution", "60"], "multiple of 8"), (["--lr", "0"], "--lr 0.0: must be > 0")]:
        code, _, err = distill_cli(*ok, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, (extra, err)
    assert not (tmp_path / "run").exists()


TRAIN_FAST = ["--resolution", "64", "--batch-size", "2", "--gradient-accumulation-steps", "2", "--log-every", "1"]


def _train(distill_cli, teacher_dir, student, data, out, steps, *extra):
    code, _, err = distill_cli("train", "--teacher", teacher_dir, "--student", student, "--data", data, "-o", out,
                               "--steps", steps, *TRAIN_FAST, *extra)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def kd_run(distill_cli_module, teacher_dir, pruned_tiny, caption_folder, tmp_path_factory) -> Path:
    return _train(distill_cli_module, teacher_dir, pruned_tiny, caption_folder, tmp_path_factory.mktemp("kd") / "a", 3)


@pytest.fixture(scope="module")
def distill_cli_module():
    from distill.cli import main

    def run(*args):
        return main([str(a) for a in args]), "", ""

    return run


def test_train_writes_student_config_and_separate_loss_columns(kd_run, pruned_tiny):
    from diffusers import StableDiffusionPipeline

    out = kd_run
    rows = (out / "logs" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,loss_sd,loss_kd_out,loss_kd_feat" and len(rows) == 4
    assert all(float(v) > 0 for v in rows[1].split(",")[1:])
    meta = json.loads((out / "distill.json").read_text())
    assert meta["config"]["lr"] == 5e-5 and meta["config"]["kd"] == {
        "lambda_sd": 1.0, "lambda_kd_out": 1.0, "lambda_kd_feat": 1.0}
    assert meta["fit"]["gradient_accumulation_steps"] == 2 and len(meta["feature_pairs"]) == 6
    assert meta["pruned_from"]["arch"]["name"] == "bk-tiny"
    pipe = StableDiffusionPipeline.from_pretrained(out / "student")
    before = StableDiffusionPipeline.from_pretrained(pruned_tiny).unet
    assert not torch.equal(pipe.unet.conv_in.weight, before.conv_in.weight)  # it trained
    assert (out / "student" / "distill.json").is_file()
    assert (out / "logs").is_dir() and (out / "checkpoints").is_dir()


def test_train_logs_every_loss_part_to_tensorboard(kd_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (kd_run / "logs").rglob("events.out.tfevents*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    parts = ["loss", "loss_sd", "loss_kd_out", "loss_kd_feat"]
    assert {f"train/{k}" for k in parts} <= set(acc.Tags()["scalars"])
    csv_rows = [r.split(",") for r in (kd_run / "logs" / "loss.csv").read_text().splitlines()[1:]]
    for i, k in enumerate(parts, start=1):  # the same values as the CSV, step by step
        tb = [(e.step, e.value) for e in acc.Scalars(f"train/{k}")]
        assert [s for s, _ in tb] == [int(r[0]) for r in csv_rows]
        assert all(abs(v - float(r[i])) <= 1e-5 * max(1.0, abs(v)) for (_, v), r in zip(tb, csv_rows))


def test_micro_steps_read_consecutive_distinct_batches():
    from distill.train import micro_batch_number

    ks = [micro_batch_number(step, micro, 4) for step in range(1, 4) for micro in range(4)]
    assert ks == list(range(12))


def test_train_resume_equals_uninterrupted(kd_run, distill_cli, teacher_dir, pruned_tiny, caption_folder, tmp_path):
    from safetensors.torch import load_file

    b = _train(distill_cli, teacher_dir, pruned_tiny, caption_folder, tmp_path / "b", 2)
    code, _, err = distill_cli("train", "--teacher", teacher_dir, "--student", pruned_tiny, "--data", caption_folder,
                               "-o", b, "--steps", 3, *TRAIN_FAST)
    assert code == 2 and "--resume" in err  # an earlier run is never silently restarted
    code, _, err = distill_cli("train", "--teacher", teacher_dir, "--student", pruned_tiny, "--data", caption_folder,
                               "-o", b, "--steps", 3, *TRAIN_FAST, "--resume", "--lr", "1e-4")
    assert code == 2 and "lr was 5e-05, now 0.0001" in err  # nor continued with other settings
    _train(distill_cli, teacher_dir, pruned_tiny, caption_folder, b, 3, "--resume")
    wa, wb = (load_file(p / "student" / "unet" / "diffusion_pytorch_model.safetensors") for p in (kd_run, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (kd_run / "logs" / "loss.csv").read_text() == (b / "logs" / "loss.csv").read_text()


def test_precomputed_latents_train_like_on_the_fly(kd_run, distill_cli, teacher_dir, pruned_tiny, caption_folder,
                                                   tmp_path):
    b = _train(distill_cli, teacher_dir, pruned_tiny, caption_folder, tmp_path / "b", 1, "--precompute")
    assert (b / "precomputed" / "meta.json").is_file()
    la, lb = ((p / "logs" / "loss.csv").read_text().splitlines()[1].split(",") for p in (kd_run, b))
    for x, y in zip(la[1:], lb[1:]):
        assert abs(float(x) - float(y)) < 1e-4 * max(1.0, abs(float(x)))


def test_train_streams_data_under_bf16_mixed_precision(distill_cli, teacher_dir, pruned_tiny, caption_folder,
                                                       tmp_path):
    from safetensors.torch import load_file

    out = _train(distill_cli, teacher_dir, pruned_tiny, caption_folder, tmp_path / "bf16", 1,
                 "--streaming", "--shuffle-buffer", "2", "--mixed-precision", "bf16",
                 "--gradient-accumulation-steps", "1")
    meta = json.loads((out / "distill.json").read_text())
    assert meta["mixed_precision"] == "bf16" and meta["config"]["data"]["streaming"]
    parts = [float(v) for v in (out / "logs" / "loss.csv").read_text().splitlines()[1].split(",")[1:]]
    assert all(0 < v < float("inf") for v in parts)
    name = "unet/diffusion_pytorch_model.safetensors"
    trained, pruned = load_file(out / "student" / name), load_file(pruned_tiny / name)
    assert all(t.dtype == torch.float32 for t in trained.values())  # saved full precision, as pruned
    assert not torch.equal(trained["conv_in.weight"], pruned["conv_in.weight"])


# ---------------------------------------------------------------------------- data
def test_map_batches_are_a_pure_function_of_the_batch_number(caption_folder):
    from distill.train_data.batches import make_batches
    from distill.train_data.sources import DataSpec

    spec = DataSpec(source=str(caption_folder), resolution=32)
    b0 = make_batches(spec, batch_size=2, seed=7)
    b1 = make_batches(spec, batch_size=2, seed=7)
    assert [e.index for e in b0.plan(3)] == [e.index for e in b1.plan(3)]
    x, y = b0.batch(1), b1.batch(1)
    assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["captions"] == y["captions"]
    assert x["pixel_values"].shape == (2, 3, 32, 32) and x["pixel_values"].abs().max() <= 1
    epoch0 = [e.index for k in range(2) for e in b0.plan(k)]
    assert sorted(epoch0) == [0, 1, 2, 3]  # one epoch = a permutation of the rows
    r0, r1 = (make_batches(spec, batch_size=2, seed=7, rank=r, world=2) for r in (0, 1))
    assert {e.index for e in r0.plan(0)}.isdisjoint({e.index for e in r1.plan(0)})
    s = make_batches(DataSpec(source=str(caption_folder), resolution=32, streaming=True, shuffle_buffer=3), 2, 7)
    first = [s.batch(k)["captions"] for k in range(3)]
    fresh = make_batches(DataSpec(source=str(caption_folder), resolution=32, streaming=True, shuffle_buffer=3), 2, 7)
    assert fresh.batch(2)["captions"] == first[2]  # seeking (resume) lands on the same rows, across epochs
    fresh = make_batches(DataSpec(source=str(caption_folder), resolution=32, streaming=True, shuffle_buffer=3), 2, 7)
    assert fresh.batch(1)["captions"] == first[1]  # ... and within one
    assert sorted(first[0] + first[1]) == sorted(f"a photo of thing {i}" for i in range(4))


@pytest.mark.parametrize("which", ["pruned", "distilled"])
def test_personalize_lora_trains_on_a_student(which, request, photos, tmp_path):
    from personalize.cli import main

    base = request.getfixturevalue("pruned_tiny" if which == "pruned" else "kd_run")
    base = base if which == "pruned" else base / "student"
    out = tmp_path / "lora"
    assert main(["lora", "--subject", str(photos), "--class-noun", "dog", "--base", str(base),
                 "--output-dir", str(out), "--steps", "2", "--resolution", "64", "--class-images", "0",
                 "--validation-images", "0"]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("where", ["teacher", "inside-teacher", "a-file"])
def test_prune_output_over_its_teacher_or_a_file_is_one_line(where, teacher_dir, tmp_path, distill_cli):
    before = sorted(p.name for p in teacher_dir.iterdir())
    if where == "a-file":
        out = tmp_path / "f"
        out.write_text("x")
    else:
        out = teacher_dir if where == "teacher" else teacher_dir / "student"
    code, _, err = distill_cli("prune", "--teacher", teacher_dir, "--arch", "bk-tiny", "-o", out, "--overwrite")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and ("the input" in lines[0] or "not a directory" in lines[0]), err
    assert sorted(p.name for p in teacher_dir.iterdir()) == before


# ---------------------------------------------------------------------------- --use-ema, --valid-steps
def _unet_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "student" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow  # five short KD runs
def test_ema_is_the_output_resumes_exactly_and_validation_grids_change_nothing(
        distill_cli, teacher_dir, pruned_tiny, caption_folder, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    args = (distill_cli, teacher_dir, pruned_tiny, caption_folder)
    p1, p2 = _train(*args, tmp_path / "p1", 1), _train(*args, tmp_path / "p2", 2)
    a = _train(*args, tmp_path / "a", 2, "--use-ema", "--valid-steps", "1", "--num-valid-images", "2")
    w1, w2, wa = _unet_weights(p1), _unet_weights(p2), _unet_weights(a)
    # the hooks leave training alone: the run's own (non-averaged) weights are the plain run's
    trained = load_file(a / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert all(torch.equal(trained[f"unet.{k}"], w2[k]) for k in w2)
    # diffusers EMAModel with its warm-up: update 1 copies (decay 0), update 2 keeps 2/11 of the average
    assert all(torch.allclose(wa[k], 2 / 11 * w1[k] + 9 / 11 * w2[k], atol=1e-6) for k in wa)
    assert any(not torch.equal(wa[k], w2[k]) for k in wa)
    assert "EMA" in json.loads((a / "distill.json").read_text())["weights"]
    # validation: a grid per step, fixed prompt and seeds (BK-SDM's valid prompt, 2 images)
    grids = sorted((a / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
    meta = json.loads(Image.open(grids[0]).text["personalize"])
    assert meta["prompts"] == ["a golden vase with different flowers"] * 2 and meta["seeds"] == [0, 1]

    # interrupted after step 1 and resumed: the same averaged output, bit for bit
    b = _train(*args, tmp_path / "b", 1, "--use-ema", "--checkpoint-every", "1", "--valid-steps", "1")
    _train(*args, b, 2, "--use-ema", "--checkpoint-every", "1", "--valid-steps", "1", "--resume")
    wb = _unet_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (b / "ema").iterdir()) == ["step-000002.safetensors"]  # older states pruned
    assert np.array_equal(np.asarray(Image.open(a / "samples/step-000002.png")),
                          np.asarray(Image.open(b / "samples/step-000002.png")))


def test_ema_decay_zero_is_the_plain_run_and_bad_values_are_one_line(distill_cli, teacher_dir, pruned_tiny,
                                                                     caption_folder, tmp_path):
    args = (distill_cli, teacher_dir, pruned_tiny, caption_folder)
    plain = _train(*args, tmp_path / "plain", 2)
    zero = _train(*args, tmp_path / "zero", 2, "--use-ema", "--ema-decay", "0")
    wp, wz = _unet_weights(plain), _unet_weights(zero)
    # s - 1 * (s - w) is w up to one rounding
    assert all(torch.allclose(wp[k], wz[k], atol=1e-6, rtol=0) for k in wp)
    for extra, msg in [(["--ema-decay", "1.5"], "--ema-decay 1.5: must be in [0, 1]"),
                       (["--valid-steps", "-1"], "--valid-steps must be >= 0")]:
        code, _, err = distill_cli("train", "--teacher", teacher_dir, "--student", pruned_tiny, "--data",
                                   caption_folder, "-o", tmp_path / "bad", *extra)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
