"""--pivotal: new tokens trained as textual inversion beside the adapter (personalize/pivotal.py),
their files read by diffusers, AUTOMATIC1111 and ComfyUI (personalize/embeddings.py), and every
reader of a run taking them with no extra flag."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FAST, kill_after_checkpoint
from personalize.embeddings import A1111_KEY, DIFFUSERS_FILE, DIFFUSERS_KEY

TOKENS = ["<s0>", "<s1>"]


def _pipe(src_dir, **kw):
    from personalize.sources import load_pipeline, resolve_source

    return load_pipeline(resolve_source(src_dir, **kw), torch.device("cpu"), torch.float32)


def _text(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _vectors(run_dir) -> torch.Tensor:
    return load_file(run_dir / DIFFUSERS_FILE)[DIFFUSERS_KEY]


def test_run_json_records_the_tokens_files_and_the_prompt_token(pivotal_run):
    run = json.loads((pivotal_run / "run.json").read_text())
    assert run["token"] == "<s0><s1>" and run["instance_prompt"] == "a <s0><s1> dog"
    assert run["pivotal"] == {"tokens": TOKENS, "identifier": "sks",
                              "files": {"diffusers": DIFFUSERS_FILE, "a1111": "embeddings/sks.safetensors"}}
    assert {DIFFUSERS_FILE, "embeddings"} <= set(run["outputs"])
    assert _vectors(pivotal_run).shape[0] == 2
    settings = (pivotal_run / "config.toml").read_text()  # `--config RUN/config.toml` repeats it
    assert "pivotal = true" in settings and "ti-lr = 0.01" in settings


def test_two_pivotal_runs_mixed_are_one_line(pivotal_run, tmp_path, cli):
    import shutil

    shutil.copytree(pivotal_run, tmp_path / "other")
    r = cli("generate", pivotal_run, "--adapter", tmp_path / "other", "--prompt", "a {token} {class}", "-n", 1,
            "--steps", 1, "-o", tmp_path / "g")
    assert r.code == 2 and "<s0> is already in the tokenizer" in r.err and "Traceback" not in r.err


def test_a_reloaded_run_reproduces_the_in_memory_validation_image_exactly(pivotal_run):
    """validation.png is drawn by the trained models in memory (the new rows a parameter of their
    own); generate's loader puts the tokens in from the run dir: the same pixels."""
    from personalize.pipeline import generate

    info = json.loads(Image.open(pivotal_run / "validation.png").text["personalize"])
    assert info["prompts"] == ["a <s0><s1> dog"]
    pipe = _pipe(pivotal_run)
    res = json.loads((pivotal_run / "run.json").read_text())["resolution"]
    img = generate(pipe, info["prompts"], info["seeds"], steps=info["steps"], guidance_scale=info["guidance_scale"],
                   resolution=res)[0]
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(pivotal_run / "validation.png").convert("RGB")))


def test_the_new_tokens_change_the_generation_and_were_trained(pivotal_run, tiny_base):
    from personalize.pipeline import generate
    from personalize.pivotal import init_vectors

    pipe = _pipe(pivotal_run)
    kw = dict(steps=2, guidance_scale=7.5, resolution=64)
    with_tokens = np.asarray(generate(pipe, ["a <s0><s1> dog"], [0], **kw)[0]).astype(int)
    without = np.asarray(generate(pipe, ["a sks dog"], [0], **kw)[0]).astype(int)
    assert np.abs(with_tokens - without).max() > 0
    base = _pipe(tiny_base)
    init = init_vectors(base.tokenizer, base.text_encoder, "dog", 2)
    assert not torch.equal(_vectors(pivotal_run), init)  # TI moved them away from the class noun's embedding


def test_diffusers_load_textual_inversion_reads_our_file(pivotal_run, tiny_base):
    """diffusers' own loader, both ways: the advanced script's (tensor + token list) and the file as
    one multi-vector token; the text encoder then encodes the prompt exactly as ours does."""
    ours = _pipe(pivotal_run)
    plain = _pipe(tiny_base)
    plain.load_textual_inversion(_vectors(pivotal_run), token=TOKENS, tokenizer=plain.tokenizer,
                                 text_encoder=plain.text_encoder)
    ids = plain.tokenizer.convert_tokens_to_ids(TOKENS)
    assert torch.equal(plain.text_encoder.get_input_embeddings().weight[ids], _vectors(pivotal_run))
    assert ids == ours.tokenizer.convert_tokens_to_ids(TOKENS)
    # the text-encoder side (no LoRA in `plain`): compare with our loader on the bare base + tokens
    from personalize.embeddings import load_run_embeddings

    comps = {"tokenizer": _pipe(tiny_base).tokenizer, "text_encoder": _pipe(tiny_base).text_encoder}
    load_run_embeddings(comps, [(pivotal_run, json.loads((pivotal_run / "run.json").read_text()))])
    ids_ = comps["tokenizer"]("a <s0><s1> dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(comps["text_encoder"](ids_)[0], _text(plain, "a <s0><s1> dog"))
    multi = _pipe(tiny_base)
    multi.load_textual_inversion(str(pivotal_run / DIFFUSERS_FILE), token="<s0>")
    m_ids = multi.tokenizer.convert_tokens_to_ids(["<s0>", "<s0>_1"])
    assert torch.equal(multi.text_encoder.get_input_embeddings().weight[m_ids], _vectors(pivotal_run))


def _a1111_embedding(data: dict) -> torch.Tensor:
    """AUTOMATIC1111's key lookup, reimplemented (the webui is not pip-installable):
    modules/textual_inversion/textual_inversion.py, create_embedding_from_data (v1.7.0+): a
    string_to_param dict, an SDXL clip_g/clip_l pair, else one tensor ("diffuser concepts")."""
    if "string_to_param" in data:
        param_dict = data["string_to_param"]
        assert len(param_dict) == 1, "embedding file has multiple terms in it"
        return next(iter(param_dict.items()))[1].float()
    if "clip_g" in data and "clip_l" in data:
        raise AssertionError("an SDXL embedding")
    assert isinstance(next(iter(data.values())), torch.Tensor) and len(data) == 1, "multiple terms"
    emb = next(iter(data.values()))
    return (emb.unsqueeze(0) if emb.ndim == 1 else emb).float()


def _comfy_embedding(data: dict, embed_key: str = "clip_l") -> torch.Tensor:
    """ComfyUI's key lookup, reimplemented: comfy/sd1_clip.py, load_embed (SD1 tokenizer's
    embedding_key 'clip_l'): string_to_param, else embed_key, else the first value."""
    if "string_to_param" in data:
        return next(iter(data["string_to_param"].values()))
    if embed_key in data:
        return data[embed_key]
    return next(iter(data.values()))


def test_a1111_and_comfyui_read_our_embedding_file(pivotal_run):
    f = pivotal_run / "embeddings" / "sks.safetensors"  # A1111: the embedding "sks" (its file name)
    data = load_file(f)
    assert list(data) == [A1111_KEY]
    assert torch.equal(_a1111_embedding(data), _vectors(pivotal_run))
    assert torch.equal(_comfy_embedding(data), _vectors(pivotal_run))
    assert torch.equal(_comfy_embedding(load_file(pivotal_run / DIFFUSERS_FILE)), _vectors(pivotal_run))


def _a1111_bundle(sd: dict) -> dict:
    """A1111's Lora extension, reimplemented: extensions-builtin/Lora/networks.py, load_network
    (v1.7.0+): `bundle_emb.<name>.string_to_param.<k>` keys become the embedding <name>."""
    bundle = {}
    for key, weight in sd.items():
        head, _, part = key.partition(".")
        if head == "bundle_emb":
            name, vec_name = part.split(".", 1)
            d = bundle.setdefault(name, {})
            if vec_name.split(".")[0] == "string_to_param":
                d["string_to_param"] = {vec_name.split(".", 1)[1]: weight}
            else:
                d[vec_name] = weight
    return bundle


def test_kohya_export_bundles_the_embedding(pivotal_run, tmp_path):
    from personalize.export.kohya import export_kohya

    out = export_kohya(pivotal_run, tmp_path / "sks.safetensors")
    sd = load_file(out)
    assert "bundle_emb.sks.string_to_param.*" in sd
    bundle = _a1111_bundle(sd)
    assert list(bundle) == ["sks"] and torch.equal(_a1111_embedding(bundle["sks"]), _vectors(pivotal_run))
    assert any(k.startswith("lora_unet_") for k in sd)


def test_merged_export_carries_the_tokens_in_tokenizer_and_embedding_table(pivotal_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from personalize.export.merged import export_merged

    out = export_merged(pivotal_run, tmp_path / "merged")
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # diffusers alone reads it
    ids = pipe.tokenizer.convert_tokens_to_ids(TOKENS)
    assert ids == pipe.tokenizer("<s0><s1>", add_special_tokens=False).input_ids
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], _vectors(pivotal_run))
    ours = _pipe(pivotal_run)
    assert torch.allclose(_text(pipe, "a <s0><s1> dog"), _text(ours, "a <s0><s1> dog"), atol=1e-5)


def test_only_the_new_rows_train_and_only_for_ti_steps(photos, tmp_path):
    """A hook records, after every step, the rows and the rest of the table: the table never
    changes; the rows change in steps 1..2 (--ti-steps 0.5 of 4) and not a bit after."""
    from personalize.config import TrainConfig
    from personalize.dreambooth import train_subject
    from personalize.fit import Hook
    from personalize.pivotal import NewTokenEmbedding

    seen = []

    def record(step, models):
        emb = models["text_encoder"].get_input_embeddings()
        assert isinstance(emb, NewTokenEmbedding)
        seen.append((emb.rows.detach().clone(), emb.base.weight.detach().clone()))

    cfg = TrainConfig(method="lora", subject=str(photos), class_noun="dog", base="tiny", steps=4, class_images=0,
                      validation_images=0, lr=1e-2, pivotal=True, ti_lr=1e-2, train_text_encoder=False,
                      mixed_precision="no", output_dir=str(tmp_path / "r"), checkpoint_every=0, sample_every=4,
                      validation_steps=2, save_every=2)
    train_subject(cfg, progress=False, hooks=(Hook("record", 1, record),))
    sampled = json.loads(Image.open(tmp_path / "r" / "samples" / "step-000004.png").text["personalize"])
    assert sampled["prompts"][0] == "a <s0><s1> dog" and all("<s0><s1>" in p for p in sampled["prompts"])
    rows, tables = zip(*seen)
    assert all(torch.equal(t, tables[0]) for t in tables)
    assert not torch.equal(rows[0], rows[1])
    assert torch.equal(rows[1], rows[2]) and torch.equal(rows[2], rows[3])
    assert torch.equal(_vectors(tmp_path / "r"), rows[3])
    step2 = tmp_path / "r" / "steps" / "step-000002"  # --save-every: a pivotal run of its own
    assert torch.equal(_vectors(step2), rows[1])
    assert json.loads((step2 / "run.json").read_text())["pivotal"]["tokens"] == TOKENS


@pytest.mark.parametrize("extra, why", [
    (["--method-is-full"], "full finetuning trains the whole text encoder"),
    (["--num-new-tokens", "0"], "--num-new-tokens must be positive"),
    (["--ti-steps", "0.1"], "--ti-steps must be a fraction"),
    (["--ti-steps", "1.5"], "--ti-steps must be a fraction"),
])
def test_bad_pivotal_settings_are_one_line(extra, why, photos, tmp_path, cli):
    method = "full" if extra == ["--method-is-full"] else "lora"
    extra = [] if method == "full" else extra
    r = cli(method, "--subject", photos, "--class-noun", "dog", *FAST, "--pivotal", *extra,
            "--output-dir", tmp_path / "r")
    assert r.code == 2 and why in r.err and "Traceback" not in r.err
    assert not (tmp_path / "r").exists()


def test_single_file_keeps_the_base_table_and_writes_the_embedding_beside(pivotal_run, tiny_base, tmp_path, cli):
    """A1111's and ComfyUI's own tokenizers index the base's table (a longer one does not load
    there): the checkpoint keeps it, the embedding file lies beside it, read by their lookup."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "dog.safetensors"
    assert cli("export", pivotal_run, "--format", "single-file", "-o", out).code == 0
    sd = load_file(out)
    table = next(v for k, v in sd.items() if k.endswith("token_embedding.weight"))
    assert table.shape[0] == 514  # the tiny base's vocabulary
    emb = tmp_path / "dog-embeddings" / "sks.safetensors"
    assert torch.equal(_a1111_embedding(load_file(emb)), _vectors(pivotal_run))
    assert "dog-embeddings/sks.safetensors" in (tmp_path / "dog.README.md").read_text()
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_base), safety_checker=None)
    pipe.load_textual_inversion(str(emb), token="sks-emb")  # diffusers takes the same file
    ids = pipe.tokenizer.convert_tokens_to_ids(["sks-emb", "sks-emb_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], _vectors(pivotal_run))


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_onnx_and_openvino_exports_carry_the_tokens(fmt, pivotal_run, tmp_path, cli):
    """The exported tokenizer has the new tokens and the exported text encoder their rows: generate
    on the export draws what the run draws ({token} filled with <s0><s1> from its run.json)."""
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "openvino")
    from _export_helpers import pixels

    gen = ["--prompt", "a {token} {class}", "--steps", "2", "-n", "1", "--seed", "3"]
    assert cli("export", pivotal_run, "--format", fmt, "-o", tmp_path / "x").code == 0
    r = cli("generate", tmp_path / "x", *gen, "-o", tmp_path / "gx")
    assert r.code == 0, r.err
    assert cli("generate", pivotal_run, *gen, "-o", tmp_path / "gt").code == 0
    got, want = pixels(tmp_path / "gx"), pixels(tmp_path / "gt")
    assert got.keys() == want.keys() and all(np.abs(got[k] - want[k]).max() <= 2 for k in got)
    side = json.loads(next((tmp_path / "gx").glob("p00-*.json")).read_text())["settings"]
    assert "<s0><s1>" in side["prompt"]
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tmp_path / "x" / "tokenizer")
    assert tok.convert_tokens_to_ids(TOKENS) == [514, 515]


def test_the_app_trains_pivotal_when_ticked_and_generates_with_the_tokens(pivotal_run, tmp_path, cli):
    """The Train tab's checkbox sets --pivotal (full refuses it in the CLI's line); the Generate
    tab draws a pivotal run with its tokens, as `personalize generate` does."""
    import shutil

    from conftest import write_photos
    from personalize.app.handlers import DATASET, OWN, App
    from personalize.errors import UserError

    app = App(tmp_path / "ws")
    photos = sorted(write_photos(tmp_path / "up", n=3).iterdir())
    args = ("mine", "tiny", OWN, None, photos, "dog", "lora", 4, 64, None, None, False, None, None, False)
    assert app.make_config(*args, True)[2].pivotal is True
    assert app.make_config(*args)[2].pivotal is False
    with pytest.raises(UserError, match="--pivotal: full finetuning"):
        app.make_config("f", "tiny", DATASET, "dog", None, "", "full", 4, 64, None, None, False, None, None, False,
                        True)
    shutil.copytree(pivotal_run, app.ws.runs / "piv")
    gallery, _, _ = app.generate(["piv"], "", "a {token} {class}", "", 0, 1, 2, 7.5, 0)
    assert gallery[0][1] == "a <s0><s1> dog · seed 0"
    assert cli("generate", pivotal_run, "--prompt", "a {token} {class}", "-n", 1, "--steps", 2, "--seed", 0,
               "-o", tmp_path / "g").code == 0
    assert np.array_equal(np.asarray(Image.open(gallery[0][0])), np.asarray(Image.open(tmp_path / "g" / "p00-s0.png")))


def test_batch_passes_pivotal_and_its_reused_base_starts_each_subject_clean(dataset, tmp_path, cli):
    """`batch --pivotal` trains every subject pivotal on the base it loads once; between subjects
    the reset takes the new tokens out of the tokenizer and the table (the second subject's
    tokens would otherwise be refused as already there), back to the pristine weights."""
    from personalize.config import TrainConfig
    from personalize.dreambooth import LoadedBase, train_subject
    from personalize.sources import resolve_base

    flags = ["--base", "tiny", "--steps", "2", "--class-images", "0", "--validation-images", "0",
             "--resolution", "32", "--lr", "1e-2", "--ti-lr", "1e-2", "--mixed-precision", "no", "--pivotal"]
    r = cli("batch", "--method", "lora", "--subjects", "dog,dog2", "--data-dir", dataset,
            "--batch-dir", tmp_path / "b", *flags)
    assert r.code == 0, r.err
    for s in ("dog", "dog2"):
        run = json.loads((tmp_path / "b" / "tiny" / "lora" / s / "run.json").read_text())
        assert run["token"] == "<s0><s1>" and run["pivotal"]["tokens"] == TOKENS
    loaded = LoadedBase(resolve_base("tiny"))
    cfg = TrainConfig(method="lora", subject="dog", data_dir=str(dataset), base="tiny", steps=2, class_images=0,
                      validation_images=0, resolution=32, pivotal=True, mixed_precision="no",
                      output_dir=str(tmp_path / "one"))
    train_subject(cfg, progress=False, loaded=loaded)
    comps = loaded.reset()
    assert len(comps["tokenizer"]) == 514 and comps["text_encoder"].get_input_embeddings().weight.shape[0] == 514
    sd = comps["text_encoder"].state_dict()
    assert all(torch.equal(sd[k], v) for k, v in loaded.pristine["text_encoder"].items())


@pytest.mark.parametrize("method", ["dora", "loha", "lokr", "oft", "boft", "hra"])
def test_every_adapter_method_trains_pivotal_and_reloads_it_exactly(method, photos, tmp_path, cli):
    """Each method's run with --pivotal: the validation image drawn in memory is drawn again, pixel
    for pixel, from the run dir (its adapter and new tokens); `--format lora` carries the embeddings."""
    from personalize.pipeline import generate

    run = tmp_path / "r"
    assert cli(method, "--subject", photos, "--class-noun", "dog", "--output-dir", run, *FAST, "--steps", "2",
               "--class-images", "0", "--lr", "1e-2", "--ti-lr", "1e-2", "--pivotal", "--mixed-precision", "no",
               *(["--oft-block-size", "8"] if method == "oft" else [])).code == 0
    info = json.loads(Image.open(run / "validation.png").text["personalize"])
    img = generate(_pipe(run), info["prompts"], info["seeds"], steps=info["steps"],
                   guidance_scale=info["guidance_scale"], resolution=64)[0]
    want = np.asarray(Image.open(run / "validation.png").convert("RGB")).astype(int)
    assert np.array_equal(np.asarray(img).astype(int), want)
    assert cli("export", run, "--format", "lora", "-o", tmp_path / "as-lora").code == 0
    assert torch.equal(_vectors(tmp_path / "as-lora"), _vectors(run))
    assert cli("generate", tmp_path / "as-lora", "--prompt", "a {token} {class}", "-n", 1, "--steps", 2,
               "-o", tmp_path / "g").code == 0
    assert json.loads((tmp_path / "g" / "p00-s0.json").read_text())["settings"]["prompt"] == "a <s0><s1> dog"


def test_eval_draws_the_protocol_prompts_with_the_new_tokens(pivotal_run, tmp_path):
    """eval's images: the 25 protocol prompts with {token} = <s0><s1> (run.json's token), drawn with
    the tokens loaded; CLIP-T scores them with the identifier (the new tokens) removed."""
    from personalize.evaluation.metrics import strip_identifier
    from personalize.generate import generate_protocol_images
    from personalize.runs import run_token

    records = generate_protocol_images(pivotal_run, tmp_path / "eval", images_per_prompt=1, steps=1,
                                       progress=False)
    assert len(records) == 25 and all("<s0><s1> dog" in r["prompt"] for r in records)
    token = run_token(json.loads((pivotal_run / "run.json").read_text()))
    assert strip_identifier(records[0]["prompt"], token).startswith("a dog")


def test_resume_is_bit_exact_across_the_end_of_ti_steps(photos, tmp_path, cli, monkeypatch):
    """Killed after the checkpoint of step 2 (the last step the new rows train, --ti-steps 0.5 of
    4) and resumed: the rows' values and AdamW state come from the checkpoint, the LoRA and the
    embeddings equal an uninterrupted run's bit for bit."""

    args = ["lora", "--subject", photos, "--class-noun", "dog", *FAST, "--class-images", "0", "--validation-images",
            "0", "--lr", "1e-2", "--ti-lr", "1e-2", "--pivotal", "--checkpoint-every", "2", "--log-every", "1"]
    assert cli(*args, "--output-dir", tmp_path / "a").code == 0
    whole_again = kill_after_checkpoint(monkeypatch, 2)
    assert cli(*args, "--output-dir", tmp_path / "b").code == 130
    ckpt = load_file(next((tmp_path / "b" / "checkpoints").glob("step-*")) / "trainable.safetensors")
    assert [k for k in ckpt if "token_embedding" in k] == ["text_encoder.embeddings.token_embedding.rows"]
    whole_again()
    assert cli(*args, "--output-dir", tmp_path / "b", "--resume").code == 0
    for f in ("pytorch_lora_weights.safetensors", DIFFUSERS_FILE):
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert (tmp_path / "a" / "logs" / "loss.csv").read_text() == (tmp_path / "b" / "logs" / "loss.csv").read_text()


@pytest.mark.slow
def test_coreml_text_encoder_has_the_new_rows_and_says_how_to_reach_them(pivotal_run, tmp_path, cli):
    """Core ML: the text encoder package's embedding table has the new rows (read back by
    coremltools), added_tokens.json names their ids; Swift's tokenizer cannot yield them (README)."""
    ct = pytest.importorskip("coremltools")

    assert cli("export", pivotal_run, "--format", "coreml", "-o", tmp_path / "c").code == 0
    assert json.loads((tmp_path / "c" / "added_tokens.json").read_text()) == {"<s0>": 514, "<s1>": 515}
    assert "Added tokens" in (tmp_path / "c" / "README.md").read_text()
    model = ct.models.MLModel(str(tmp_path / "c" / "TextEncoder.mlpackage"), skip_model_load=True)
    meta = ct.optimize.coreml.get_weights_metadata(model, 2048)  # the table (a gather's) is never palettized
    tables = [m.val for k, m in meta.items() if "token_embedding" in k]
    assert len(tables) == 1 and tables[0].shape[0] == 516
    np.testing.assert_allclose(tables[0][514:].astype(np.float32), _vectors(pivotal_run).numpy(), rtol=1e-2,
                               atol=1e-3)  # fp16 in the package


def test_a_damaged_embedding_file_is_one_line_naming_it(pivotal_run, tmp_path, cli):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pivotal_run, run)
    (run / DIFFUSERS_FILE).write_bytes(b"\0" * 64)
    r = cli("generate", run, "--prompt", "a {token} {class}", "-n", 1, "--steps", 1, "-o", tmp_path / "g")
    assert r.code == 2 and str(run / DIFFUSERS_FILE) in r.err and "Traceback" not in r.err
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").glob("*.png"))


def test_a_token_that_cannot_name_a_file_is_refused_with_pivotal(photos, tmp_path, cli):
    r = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--pivotal", "--token", "a/b",
            "--output-dir", tmp_path / "r")
    assert r.code == 2 and "--token 'a/b'" in r.err and not (tmp_path / "r").exists()
