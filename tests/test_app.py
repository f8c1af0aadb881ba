"""`personalize app`: the web app driven through gradio_client against a real server on a free
local port, with the `tiny` backbone and synthetic photos. What the app does must equal what the
CLI does: the same refusal lines, the same generated PNGs and metadata, the same export."""

from __future__ import annotations

import builtins
import importlib.util
import inspect
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_photos

# what tests/conftest.py's FAST flags set, for the fields the page does not show
FAST = dict(class_image_steps=2, validation_images=1, validation_steps=2, log_every=2)


# --------------------------------------------------------------------------- no Gradio needed
def test_app_without_gradio_is_one_line(cli, monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_gradio(name, *a, **kw):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    r = cli("app", "--workspace", tmp_path / "ws")
    assert r.code == 2
    assert r.err.count("\n") == 1 and 'pip install -e ".[app]"' in r.err
    assert not (tmp_path / "ws").exists()


def test_auth_flag_is_checked(cli, tmp_path):
    r = cli("app", "--workspace", tmp_path / "ws", "--auth", "nopassword")
    assert r.code == 2 and r.err.startswith("error: --auth: expected user:password")


@pytest.mark.parametrize("bad", ["../escape", "/abs", "a/b", ".hidden", "-x", "", "a" * 65, "x..y"])
def test_run_names_are_plain_folder_names(tmp_path, bad):
    from personalize.app.workspace import Workspace
    from personalize.errors import UserError

    ws = Workspace(tmp_path / "ws")
    with pytest.raises(UserError, match="not a path"):
        ws.new_run_dir(bad)
    with pytest.raises(UserError):
        ws.run_dir(bad)


def test_a_run_symlinked_out_of_the_workspace_is_refused(tmp_path, lora_run):
    from personalize.app.workspace import Workspace
    from personalize.errors import UserError

    ws = Workspace(tmp_path / "ws")
    (ws.runs / "sneaky").symlink_to(lora_run, target_is_directory=True)
    with pytest.raises(UserError, match="outside the workspace"):
        ws.run_dir("sneaky")
    (ws.runs / "real").mkdir()
    assert ws.run_dir("real") == ws.runs / "real"


@pytest.mark.slow
def test_ctrl_c_then_shutdown_stops_at_a_checkpoint(tmp_path):
    """Ctrl-C on `personalize app` reaches the worker (same process group), then the app's shutdown
    asks again: the run still stops cleanly after a step, with that step's checkpoint."""
    import signal

    from personalize.app.jobs import JobManager
    from personalize.app.workspace import Workspace
    from personalize.checkpoints import list_checkpoints
    from personalize.config import TrainConfig

    ws = Workspace(tmp_path / "ws")
    photos = write_photos(tmp_path / "p", n=3)
    cfg = TrainConfig(method="lora", subject=str(photos), class_noun="dog", base="tiny", steps=500, lr=1e-2, rank=4,
                      class_images=0, output_dir=str(ws.runs / "r"), checkpoint_every=0, **FAST)
    jobs = JobManager()
    job = jobs.start_train("r", ws.runs / "r", ws.save_job("r", cfg.to_json()), cfg.steps, cwd=ws.root)
    deadline = time.time() + 120
    while job.step < 2 and job.alive and time.time() < deadline:
        time.sleep(0.1)
    job.proc.send_signal(signal.SIGINT)
    jobs.shutdown()
    assert job.status == "cancelled", job.message
    stopped = int(job.message.split("cancelled at step ")[1].split("/")[0])
    assert [s for s, _ in list_checkpoints(ws.runs / "r")] == [stopped]


# --------------------------------------------------------------------------- the served app
HAVE_GRADIO = all(importlib.util.find_spec(m) for m in ("gradio", "gradio_client"))
needs_gradio = pytest.mark.skipif(not HAVE_GRADIO, reason='needs the app extra: pip install -e ".[app]"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, root: Path, **kw):
        from gradio_client import Client

        from personalize.app import create, launch_kwargs

        self.app, self.demo = create(root, train_defaults=FAST, **kw)
        args = launch_kwargs(self.app, "127.0.0.1", free_port(), False, None) | {"quiet": True}
        self.demo.launch(prevent_thread_lock=True, **args)
        self.client = Client(self.demo.local_url, verbose=False)
        self.ws = self.app.ws

    def close(self):
        self.app.jobs.shutdown()
        self.demo.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("app") / "workspace", max_photo_mb=1)
    yield s
    s.close()


def files(paths):
    from gradio_client import handle_file

    return [handle_file(str(p)) for p in paths]


def train_args(name, photos, steps=4, **kw):
    a = dict(name=name, base="tiny", source="my photos", subject="dog", photos=files(sorted(photos.iterdir())),
             class_noun="dog", method="lora", steps=steps, resolution=0, lr=1e-2, rank=4, prior=True,
             class_images=2, sample_every=2, overwrite=False, pivotal=False)
    a.update(kw)
    return list(a.values())


def app_error(served, *args, api_name):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        served.client.predict(*args, api_name=api_name)
    return str(e.value)


def cli_error_line(cli, tmp_path, photo: Path) -> str:
    """The CLI's line for a folder holding only `photo`, with the folder part of the path removed."""
    d = tmp_path / f"cli-{photo.stem}"
    d.mkdir()
    (d / photo.name).write_bytes(photo.read_bytes())
    r = cli("lora", "--subject", d, "--class-noun", "dog", "--base", "tiny", "--output-dir", tmp_path / "never")
    assert r.code == 2 and not (tmp_path / "never").exists()
    return r.err.strip().removeprefix("error: ").replace(str(d / photo.name), photo.name)


@needs_gradio
def test_bad_uploads_are_refused_one_by_one_with_the_cli_message(served, tmp_path, cli):
    good = write_photos(tmp_path / "good", n=3)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.jpg").write_text("not an image")
    truncated = (good / "00.jpg").read_bytes()
    (bad / "cut.jpg").write_bytes(truncated[: len(truncated) // 3])
    Image.new("RGB", (32, 40), "red").save(bad / "small.png")  # under tiny's 64 px
    thumbs, msg = served.client.predict(files([*sorted(good.iterdir()), *sorted(bad.iterdir())]), "tiny", 0,
                                        api_name="/check_photos")
    assert msg.splitlines()[0] == "3 photo(s) accepted, 3 refused:"
    assert len(thumbs) == 3
    for photo in sorted(bad.iterdir()):
        line = cli_error_line(cli, tmp_path, photo)
        assert line.startswith(photo.name + ":")
        assert f"- error: {line}" in msg.splitlines(), (line, msg)


@needs_gradio
def test_exif_orientation_is_honoured_in_thumbnails(served, tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the picture is taller than the stored pixels
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif)
    thumbs, msg = served.client.predict(files([path]), "tiny", 0, api_name="/check_photos")
    w, h = Image.open(thumbs[0]["image"]).size
    assert h > w, (w, h)


@needs_gradio
def test_upload_count_and_size_limits(served, tmp_path):
    from personalize.app.workspace import Photo

    many = write_photos(tmp_path / "many", n=21)
    assert "21 photos: at most 20" in app_error(served, files(sorted(many.iterdir())), "tiny", 0,
                                                 api_name="/check_photos")
    big = tmp_path / "big.png"  # ~3 MB of noise against the fixture's 1 MB limit
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(big)
    with pytest.raises(Exception, match="exceeds the maximum file size of 1048576 bytes"):
        served.client.predict(files([big]), "tiny", 0, api_name="/check_photos")
    # and the app's own check, for a file that got past the server's limit
    good, bad = served.ws.check_photos([Photo(big, "big.png")], 64)
    assert not good and bad == [f"big.png: {big.stat().st_size / 2**20:.1f} MB; a photo is at most 1 MB"]
    few = write_photos(tmp_path / "few", n=2)
    msg = app_error(served, *train_args("too-few", few), api_name="/train")
    assert "DreamBooth needs at least 3" in msg
    assert not (served.ws.runs / "too-few").exists()


@needs_gradio
def test_path_traversal_is_refused_and_nothing_is_written_outside(served, tmp_path, lora_run):
    photos = write_photos(tmp_path / "p", n=3)
    outside = served.ws.root.parent
    before = sorted(p.name for p in outside.iterdir())
    msg = app_error(served, *train_args("../escape", photos), api_name="/train")
    assert msg.startswith("run name '../escape':")
    for bad in ("../escape", str(lora_run), "../../" + lora_run.name):
        assert "not a run of this workspace" in app_error(served, [bad], "", "a {token} {class}", "", 0, 1, 2, 7.5, 0,
                                                          api_name="/generate")
        assert "not a run of this workspace" in app_error(served, bad, "kohya", False, api_name="/export")
        assert "not a run of this workspace" in app_error(served, bad, api_name="/run_details")
    assert "interrupted run" in app_error(served, "../x", api_name="/resume")
    assert sorted(p.name for p in outside.iterdir()) == before


@needs_gradio
@pytest.mark.slow
def test_train_generate_export_like_the_cli(served, tmp_path, cli, lora_run):
    from safetensors.torch import load_file

    photos = write_photos(tmp_path / "my_dog", n=4)
    progress, samples, log = served.client.predict(*train_args("dog1", photos), api_name="/train")
    assert progress.startswith("**finished** `dog1` · step 4/4 · loss ")
    run_dir = served.ws.runs / "dog1"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["config"]["steps"] == 4 and run["config"]["class_images"] == 2
    assert f"loss {run['stats']['final_losses']['loss']:.4f}" in progress
    assert [s["caption"] for s in samples] == ["step 2", "step 4"]  # the grids as they appeared
    # the uploaded photos are the run's subject, stored under names the app made
    assert sorted(p.name for p in (served.ws.uploads / "dog1").iterdir()) == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]

    table = served.client.predict(api_name="/runs")[0]
    row = dict(zip(table["headers"], next(r for r in table["data"] if r[0] == "dog1")))
    assert row["status"] == "finished" and row["base"] == "tiny" and row["method"] == "lora"
    assert float(row["final loss"]) == pytest.approx(run["stats"]["final_losses"]["loss"], abs=1e-4)

    gallery, archive, info = served.client.predict(["dog1"], "", "a {token} {class} on the beach", "blurry", 3, 2, 2,
                                                   7.5, 0, api_name="/generate")
    assert len(gallery) == 2 and gallery[0]["caption"] == "a sks dog on the beach · seed 3"
    out = tmp_path / "cli-gen"
    r = cli("generate", run_dir, "--prompt", "a {token} {class} on the beach", "--negative-prompt", "blurry",
            "--seed", 3, "-n", 2, "--steps", 2, "--guidance-scale", 7.5, "-o", out)
    assert r.code == 0, r.err
    for item, seed in zip(gallery, (3, 4)):
        ours, theirs = Image.open(item["image"]), Image.open(out / f"p00-s{seed}.png")
        assert json.loads(ours.text["personalize"]) == json.loads(theirs.text["personalize"])
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    import zipfile

    assert sorted(n for n in zipfile.ZipFile(archive).namelist() if n.endswith(".png")) == [
        "grid.png", "p00-s3.png", "p00-s4.png"]

    # several runs mixed with a weight each, as `generate RUN --adapter RUN2 --adapter-weights`
    import shutil

    shutil.copytree(lora_run, served.ws.runs / "other")
    gallery, _, _ = served.client.predict(["dog1", "other"], "0.7,0.5", "a {token} {class}", "", 0, 1, 2, 7.5, 0,
                                          api_name="/generate")
    r = cli("generate", run_dir, "--adapter", served.ws.runs / "other", "--adapter-weights", "0.7,0.5", "--prompt",
            "a {token} {class}", "-n", 1, "--steps", 2, "--seed", 0, "-o", tmp_path / "cli-mix")
    assert r.code == 0, r.err
    ours, theirs = Image.open(gallery[0]["image"]), Image.open(tmp_path / "cli-mix" / "p00-s0.png")
    assert json.loads(ours.text["personalize"]) == json.loads(theirs.text["personalize"])
    assert [a["weight"] for a in json.loads(ours.text["personalize"])["adapters"]] == [0.7, 0.5]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert "adapter-weights has 1 values for 2" in app_error(served, ["dog1", "other"], "0.7", "a {token} {class}", "",
                                                             0, 1, 2, 7.5, 0, api_name="/generate")

    exported, msg = served.client.predict("dog1", "kohya", False, api_name="/export")
    assert (served.ws.exports / "dog1-kohya.safetensors").is_file()
    assert cli("export", run_dir, "--format", "kohya", "-o", tmp_path / "cli.safetensors").code == 0
    ours, theirs = load_file(exported), load_file(tmp_path / "cli.safetensors")
    assert ours.keys() == theirs.keys() and any(k.startswith("lora_unet_") for k in ours)
    assert all((ours[k] == theirs[k]).all() for k in ours)
    # a second export of the same name is refused with the CLI's line, unless overwrite
    assert "already exists; pass --overwrite" in app_error(served, "dog1", "kohya", False, api_name="/export")
    served.client.predict("dog1", "kohya", True, api_name="/export")

    grid, details = served.client.predict("dog1", api_name="/run_details")
    assert Path(grid).name.endswith(".png") and json.loads(details)["status"] == "finished"
    # evaluation: evaluator weights that are not there are the CLI's line; tiny local ones score it
    msg = app_error(served, "dog1", str(tmp_path / "no-dino"), str(tmp_path / "no-clip"), 1, 2, api_name="/evaluate")
    assert "no-dino" in msg
    from _metric_fixtures import build_tiny_clip, build_tiny_dino

    dino, clip = build_tiny_dino(tmp_path / "dino"), build_tiny_clip(tmp_path / "clip")
    msg = served.client.predict("dog1", str(dino), str(clip), 1, 2, api_name="/evaluate")
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())["scores"]
    assert f"DINO {scores['dino']:.3f}" in msg and f"CLIP-T {scores['clip_t']:.3f}" in msg
    table = served.client.predict(api_name="/runs")[0]
    row = dict(zip(table["headers"], next(r for r in table["data"] if r[0] == "dog1")))
    assert float(row["DINO"]) == pytest.approx(scores["dino"], abs=1e-4)
    assert float(row["CLIP-I"]) == pytest.approx(scores["clip_i"], abs=1e-4)


@needs_gradio
@pytest.mark.slow
def test_cancel_leaves_a_resumable_run_and_the_queue_shows_position(served, tmp_path, cli):
    import torch

    from gradio_client.utils import Status

    photos = write_photos(tmp_path / "my_cat", n=3, seed=5)
    job = served.client.submit(*train_args("cat1", photos, steps=400, sample_every=0, class_images=0, prior=False),
                               api_name="/train")
    deadline = time.time() + 120
    while (served.app.jobs.train is None or served.app.jobs.train.name != "cat1"
           or served.app.jobs.train.step < 2) and time.time() < deadline:
        time.sleep(0.2)
    assert served.app.jobs.train.step >= 2
    # a page opened meanwhile attaches to the running training: live step, loss, s/step, ETA
    watcher = served.client.submit(api_name="/watch")
    while not watcher.outputs() and time.time() < deadline:
        time.sleep(0.2)
    live = watcher.outputs()[0][0]
    assert live.startswith("**training** `cat1` · step ") and "/400 · loss " in live
    assert " s/step · ETA " in live and "- s/step" not in live
    # a second long job waits in Gradio's queue behind the training, with its position
    waiting = served.client.submit(["cat1"], "", "a {token} {class}", "", 0, 1, 2, 7.5, 0, api_name="/generate")
    for _ in range(50):
        st = waiting.status()
        if st.code == Status.IN_QUEUE:
            break
        time.sleep(0.1)
    assert st.code == Status.IN_QUEUE and st.rank is not None and st.queue_size >= 1
    # the runs list (not a long job) answers meanwhile and shows it running
    table = served.client.predict(api_name="/runs")[0]
    assert dict(zip(table["headers"], next(r for r in table["data"] if r[0] == "cat1")))["status"] == "running"

    assert served.client.predict(api_name="/cancel").startswith("cancelling 'cat1'")
    progress = job.result(timeout=120)[0]
    assert "cancelled at step" in progress and "resumable" in progress
    assert watcher.result(timeout=30)[0] == progress
    stopped = int(progress.split("cancelled at step ")[1].split("/")[0])
    assert 2 <= stopped < 400
    from personalize.checkpoints import list_checkpoints

    assert [s for s, _ in list_checkpoints(served.ws.runs / "cat1")] == [stopped]  # the cancel step's checkpoint
    with pytest.raises(Exception, match="cat1: no run.json"):
        waiting.result(timeout=60)  # the queued generate ran after it, and the CLI refuses an unfinished run

    table, _, _, interrupted = served.client.predict(api_name="/runs")
    row = dict(zip(table["headers"], next(r for r in table["data"] if r[0] == "cat1")))
    assert row["status"] == f"interrupted at step {stopped}"
    assert "cat1" in str(interrupted)  # offered for Resume

    # Resume continues from the checkpoint (a short rest: steps lowered on the record to keep it fast)
    record = served.ws.job_path("cat1")
    doc = json.loads(record.read_text())
    assert doc["config"]["checkpoint_every"] == 40  # a tenth of the run for an adapter method
    doc["config"]["steps"] = stopped + 2
    record.write_text(json.dumps(doc))
    progress, _, log = served.client.predict("cat1", api_name="/resume")
    assert progress.startswith(f"**finished** `cat1` · step {stopped + 2}/{stopped + 2}")
    assert "resuming from" in log and f"(step {stopped}/{stopped + 2})" in log
    run = json.loads((served.ws.runs / "cat1" / "run.json").read_text())
    assert run["status"] == "finished" and run["config"]["resume"] is True
    # cancelled + resumed ends with the weights of a CLI run that was never stopped
    from safetensors.torch import load_file

    r = cli("lora", "--subject", served.ws.uploads / "cat1", "--class-noun", "dog", "--base", "tiny",
            "--steps", stopped + 2, "--lr", 1e-2, "--rank", 4, "--class-images", 0, "--class-image-steps", 2,
            "--validation-images", 1, "--validation-steps", 2, "--log-every", 2, "--output-dir", tmp_path / "straight")
    assert r.code == 0, r.err
    ours = load_file(served.ws.runs / "cat1" / "pytorch_lora_weights.safetensors")
    theirs = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@needs_gradio
def test_app_command_prints_the_no_auth_line_off_localhost(cli, tmp_path, monkeypatch):
    import gradio

    launched = {}
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kw: launched.update(kw))
    r = cli("app", "--workspace", tmp_path / "ws", "--host", "0.0.0.0", "--port", 7999)
    assert r.code == 0
    assert "no authentication: anyone who can reach port 7999 of this machine" in r.out and "--auth user:pass" in r.out
    assert launched["server_name"] == "0.0.0.0" and launched["server_port"] == 7999 and launched["auth"] is None
    assert launched["allowed_paths"] == [str((tmp_path / "ws").resolve())]
    r = cli("app", "--workspace", tmp_path / "ws", "--auth", "me:secret")
    assert "no authentication" not in r.out and launched["auth"] == ("me", "secret")
    assert launched["server_name"] == "127.0.0.1"
    r = cli("app", "--workspace", tmp_path / "ws", "--share", "--auth", "me:secret")
    assert "no authentication" not in r.out
    r = cli("app", "--workspace", tmp_path / "ws", "--share")
    assert "gradio.live" in r.out


# --------------------------------------------------------------------------- issue 25: the page's inputs, handler by handler
def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def bare_app(tmp_path, monkeypatch):
    """An App on a fresh workspace, not served (the handlers are called directly); a training it
    would start fails the test instead of starting a worker."""
    from personalize.app.handlers import App

    app = App(tmp_path / "ws", train_defaults=FAST)

    def no_start(*a, **kw):
        raise AssertionError("the bad input reached the training job")

    monkeypatch.setattr(app, "_start", no_start)
    yield app
    app.jobs.shutdown()


def gr_error(fn, *args) -> str:
    """The one line a handler shows for bad input (a gr.Error; a generator handler's first step)."""
    import gradio as gr

    with pytest.raises(gr.Error) as e:
        out = fn(*args)
        if inspect.isgenerator(out):
            next(out)
    line = e.value.message  # str() of a gr.Error is its repr
    assert "\n" not in line and "Traceback" not in line, line
    return line


def page_train(app, photos, **kw):
    a = dict(name="r", base="tiny", source="my photos", subject="dog", photos=[str(p) for p in sorted(photos.iterdir())],
             class_noun="dog", method="lora", steps=4, resolution=0, lr=1e-2, rank=4, prior=True, class_images=2,
             sample_every=0, overwrite=False)
    a.update(kw)
    return list(a.values())


TRAIN_BAD = [  # (page field=value, what the line names)
    (dict(steps=0), "--steps"), (dict(steps=-3), "--steps"), (dict(steps=float("nan")), "--steps"),
    (dict(steps=2.5), "--steps"), (dict(steps="many"), "--steps"), (dict(steps=None), "--steps"),
    (dict(resolution=100), "--resolution"), (dict(resolution=-64), "--resolution"),
    (dict(resolution=float("inf")), "--resolution"),
    (dict(lr=-1e-4), "--lr"), (dict(lr=float("nan")), "--lr"),
    (dict(rank=0), "--rank"), (dict(rank=-4), "--rank"), (dict(rank=float("nan")), "--rank"),
    (dict(class_images=-1), "--class-images"), (dict(sample_every=-1), "--sample-every"),
    (dict(method="lorax"), "lorax"), (dict(method="generate"), "generate"),
    (dict(prior=True, class_images=float("nan")), "--class-images"),
]


@needs_gradio
@pytest.mark.parametrize("field, culprit", TRAIN_BAD, ids=[",".join(f"{k}={v}" for k, v in f.items()) for f, _ in TRAIN_BAD])
def test_train_inputs_go_through_the_cli_checks_and_write_nothing(bare_app, tmp_path, field, culprit):
    """Each value of the Train tab is checked as the CLI's flag (its type, then TrainConfig.validate):
    one line naming the flag, before the photos are stored or anything else is written."""
    photos = write_photos(tmp_path / "p", n=3, size=(64, 64))
    before = _tree(bare_app.ws.root)
    line = gr_error(bare_app.train, *page_train(bare_app, photos, **field))
    assert culprit in line, line
    assert _tree(bare_app.ws.root) == before  # no uploads/r, no job record


@needs_gradio
def test_page_defaults_that_mean_the_recipe_still_do(bare_app, tmp_path):
    """Odd but valid: resolution 0 and lr 0 are the page's "the base's" and "the recipe's"."""
    photos = write_photos(tmp_path / "p", n=3, size=(64, 64))
    _, _, cfg = bare_app.make_config(*page_train(bare_app, photos, resolution=0, lr=0))
    assert cfg.resolution is None and cfg.lr is None and cfg.rank == 4 and cfg.class_images == 2


@needs_gradio
def test_a_decompression_bomb_upload_is_the_cli_line(bare_app, tmp_path, cli):
    """A PNG claiming 30000x30000 pixels was a raw AppError: now the CLI's own line, naming the file."""
    from test_hostile_training import png_header

    bad = tmp_path / "up"
    bad.mkdir()
    (bad / "bomb.png").write_bytes(png_header(30000, 30000))
    good = write_photos(tmp_path / "good", n=3, size=(64, 64))
    thumbs, msg = bare_app.check_photos([str(p) for p in [*sorted(good.iterdir()), bad / "bomb.png"]], "tiny", 0)
    assert len(thumbs) == 3 and msg.splitlines()[0] == "3 photo(s) accepted, 1 refused:"
    assert msg.splitlines()[1] == f"- error: {cli_error_line(cli, tmp_path, bad / 'bomb.png')}"
    line = gr_error(bare_app.train, *page_train(bare_app, bad))
    assert line.startswith("bomb.png: ") and "pixels" in line
    assert not (bare_app.ws.uploads / "r").exists()


@needs_gradio
@pytest.mark.parametrize("resolution", [float("nan"), "abc", 100])
def test_the_photo_check_takes_the_resolution_as_the_cli_does(bare_app, tmp_path, resolution):
    photos = write_photos(tmp_path / "p", n=1, size=(64, 64))
    assert "--resolution" in gr_error(bare_app.check_photos, [str(p) for p in photos.iterdir()], "tiny", resolution)


GENERATE_BAD = [  # (page field=value, the flag the line names): the CLI's ranges, not copies of them
    (dict(guidance=1e30), "--guidance-scale"), (dict(guidance=-1), "--guidance-scale"),
    (dict(guidance=float("nan")), "--guidance-scale"),
    (dict(steps=0), "--steps"), (dict(steps=100_000), "--steps"), (dict(steps=1.5), "--steps"),
    (dict(seed=-1), "--seed"), (dict(seed=2**64), "--seed"),
    (dict(n=0), "--images-per-prompt"), (dict(n=10**6), "--images-per-prompt"),
    (dict(resolution=100), "--resolution"), (dict(resolution=-8), "--resolution"),
    (dict(weights="11"), "--adapter-weights"), (dict(weights="a,b"), "--adapter-weights"),
    (dict(weights="nan"), "--adapter-weights"),
]


@needs_gradio
@pytest.mark.parametrize("field, culprit", GENERATE_BAD,
                         ids=[",".join(f"{k}={v}" for k, v in f.items()) for f, _ in GENERATE_BAD])
def test_generate_inputs_go_through_the_cli_flags(bare_app, lora_run, field, culprit):
    """The Generate tab's values are `personalize generate`'s flags, parsed by its parser: a
    guidance of 1e30 drew flat black images; now it is the CLI's line, and nothing is drawn."""
    import shutil

    shutil.copytree(lora_run, bare_app.ws.runs / "r")
    before = _tree(bare_app.ws.root)
    a = dict(runs=["r"], weights="", prompt="a {token} {class}", negative="", seed=0, n=1, steps=2, guidance=7.5,
             resolution=0)
    a.update(field)
    line = gr_error(bare_app.generate, *a.values())
    assert culprit in line, line
    assert _tree(bare_app.ws.root) == before


@needs_gradio
@pytest.mark.parametrize("ipp, steps, culprit", [(0, 0, "--images-per-prompt"), (float("nan"), 0, "--images-per-prompt"),
                                                 (2, -5, "--steps"), (2, 1e9, "--steps")])
def test_evaluate_inputs_go_through_the_cli_flags(bare_app, lora_run, ipp, steps, culprit):
    import shutil

    shutil.copytree(lora_run, bare_app.ws.runs / "r")
    before = _tree(bare_app.ws.root)
    assert culprit in gr_error(bare_app.evaluate, "r", "/nonexistent/dino", "/nonexistent/clip", ipp, steps)
    assert _tree(bare_app.ws.root) == before


@needs_gradio
def test_a_second_training_while_one_runs_is_one_line_and_writes_nothing(bare_app, tmp_path):
    """Concurrent: Start again (same name or another) while a training runs: refused before the
    photos are stored, so the running job's photos and job record stay as they are."""
    from types import SimpleNamespace

    photos = write_photos(tmp_path / "p", n=3, size=(64, 64))
    bare_app.jobs.train = SimpleNamespace(alive=True, name="r", step=1, total=4)
    try:
        before = _tree(bare_app.ws.root)
        for name in ("r", "other"):
            assert "training 'r' is running" in gr_error(bare_app.train, *page_train(bare_app, photos, name=name))
        assert _tree(bare_app.ws.root) == before
    finally:
        bare_app.jobs.train = None


@needs_gradio
def test_retraining_a_run_name_without_overwrite_keeps_its_photos(bare_app, tmp_path, lora_run):
    """A finished run of that name, 'overwrite' not ticked: refused before its uploaded photos are
    replaced (the worker refused it too, but only after the run's photos were swapped)."""
    import shutil

    shutil.copytree(lora_run, bare_app.ws.runs / "r")
    kept = write_photos(bare_app.ws.uploads / "r", n=3, size=(64, 64), seed=5)
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    line = gr_error(bare_app.train, *page_train(bare_app, write_photos(tmp_path / "p", n=3, size=(64, 64))))
    assert "'r'" in line and "overwrite" in line
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before


# --------------------------------------------------------------------------- issue 26: settings of the app's runs
@needs_gradio
def test_app_runs_take_the_train_preset_then_the_file_then_the_page(tmp_path, tiny_base):
    """`personalize app --train-preset phone-photos --train-config F`: every run the app starts
    carries what the page does not show (buckets, captions, the base-prediction prior, EMA), the file
    over the preset, the page's own fields over both; and such a run trains."""
    from personalize.app.handlers import App
    from personalize.dreambooth import train_subject

    f = tmp_path / "s.toml"
    f.write_text('ema = true\nema-decay = 0.9\ncaption-dropout = 0.2\nsteps = 999\nbase = "bk-sdm-tiny"\n')
    app = App(tmp_path / "ws", train_defaults=FAST, preset="phone-photos", config=f)
    try:
        photos = write_photos(tmp_path / "p", n=3, size=(64, 80))
        _, run_dir, cfg = app.make_config(*page_train(app, photos, base=str(tiny_base)))
        assert (cfg.prior, cfg.buckets, cfg.shuffle_caption) == ("base-prediction", True, True)  # the preset
        assert (cfg.ema, cfg.ema_decay, cfg.caption_dropout) == (True, 0.9, 0.2)  # the file over the preset
        assert (cfg.steps, cfg.rank, cfg.base) == (4, 4, str(tiny_base))  # the page over both
        plain = App(tmp_path / "ws2", train_defaults=FAST)
        _, _, cfg0 = plain.make_config(*page_train(plain, photos, base=str(tiny_base)))
        assert (cfg0.prior, cfg0.ema, cfg0.caption_dropout) == ("class-images", False, 0.0)
        plain.jobs.shutdown()
        cfg.validation_images = 0
        train_subject(cfg, log=lambda s: None, progress=False)
        meta = json.loads((run_dir / "run.json").read_text())
        assert meta["config"]["ema"] and meta["config"]["prior"] == "base-prediction"
        assert (run_dir / "pytorch_lora_weights.safetensors").is_file()
    finally:
        app.jobs.shutdown()


@needs_gradio
@pytest.mark.parametrize("flags, culprit", [(["--train-preset", "nope"], "nope"),
                                            (["--train-config", "{bad}"], "emma"),
                                            (["--train-config", "{missing}"], "missing.toml")])
def test_app_refuses_bad_train_settings_in_one_line_before_serving(cli, tmp_path, monkeypatch, flags, culprit):
    import gradio

    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kw: pytest.fail("served with bad settings"))
    bad = tmp_path / "bad.toml"
    bad.write_text("emma = true\n")
    r = cli("app", "--workspace", tmp_path / "ws", *[x.format(bad=bad, missing=tmp_path / "missing.toml") for x in flags])
    assert r.code != 0 and culprit in r.err and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "ws").exists()
