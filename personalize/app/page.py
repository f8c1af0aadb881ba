"""The app's page (Gradio Blocks): the Train, Generate and Runs tabs, and which handler
(`handlers.App`) each button, upload and page load calls."""

from __future__ import annotations

from ..backbones import BACKBONES, is_pipeline_dir
from ..defaults import DEFAULT_CLIP, DEFAULT_DINO, METHODS
from ..subjects import load_subjects
from .handlers import DATASET, OWN, RUN_COLUMNS, App, export_formats
from .workspace import MAX_PHOTOS, Workspace

LONG = {"concurrency_limit": 1, "concurrency_id": "job"}  # one long job at a time, the rest wait in the queue


def methods() -> list[str]:
    return list(METHODS)


def base_choices(ws: Workspace) -> list[tuple[str, str]]:
    """Registry names with their U-Net sizes, then local pipeline dirs in the workspace."""
    out = [(f"{s.name} ({s.unet_params_card} U-Net)" if s.unet_params_card else f"{s.name} ({s.description})", s.name)
           for s in BACKBONES.values()]
    for root in (ws.root / "bases", ws.exports):
        if root.is_dir():
            out += [(f"{p.name} (local: {p})", str(p)) for p in sorted(root.iterdir()) if is_pipeline_dir(p)]
    return out


def build(app: App):
    """The Gradio Blocks of `app` (not launched)."""
    import gradio as gr

    subjects = load_subjects()
    with gr.Blocks(title="personalize") as demo:
        gr.Markdown(f"# personalize\nDreamBooth on BK-SDM backbones, the same code as the `personalize` CLI. "
                    f"Workspace: `{app.ws.root}`")
        with gr.Tab("Train"):
            with gr.Row():
                name = gr.Textbox(label="run name", value="my-run", elem_id="run-name", info="a folder under runs/ in the workspace")
                base = gr.Dropdown(base_choices(app.ws), value="bk-sdm-base", label="base", allow_custom_value=True, elem_id="base",
                                   info="registry name, or a local diffusers pipeline folder")
                method = gr.Dropdown(methods(), value="lora", label="method")
            with gr.Row():
                source = gr.Radio([DATASET, OWN], value=OWN, label="subject")
                subject = gr.Dropdown(list(subjects), value="dog", label="DreamBooth subject")
                class_noun = gr.Textbox(label="class noun", placeholder="dog, backpack, ...", elem_id="class-noun")
            photos = gr.File(label=f"your photos (3-{MAX_PHOTOS})", file_count="multiple", file_types=["image"],
                             elem_id="photos")
            thumbs = gr.Gallery(label="accepted photos", columns=6, height=160, elem_id="thumbs")
            photo_msg = gr.Markdown(elem_id="photo-msg")
            with gr.Row():
                steps = gr.Number(800, label="steps", precision=0, elem_id="steps")
                resolution = gr.Number(0, label="resolution (0: the base's)", precision=0)
                lr = gr.Number(0, label="learning rate (0: the recipe's)", elem_id="lr")
                rank = gr.Number(16, label="LoRA rank", precision=0, elem_id="rank")
            with gr.Row():
                prior = gr.Checkbox(True, label="prior preservation")
                class_images = gr.Number(200, label="class images", precision=0, elem_id="class-images")
                sample_every = gr.Number(0, label="sample grid every N steps (0: off)", precision=0, elem_id="sample-every")
                overwrite = gr.Checkbox(False, label="overwrite a finished run of this name")
                pivotal = gr.Checkbox(False, label="pivotal tuning (new tokens <s0><s1> trained too; not full)",
                                      elem_id="pivotal")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="start")
                cancel = gr.Button("Cancel", elem_id="cancel")
            with gr.Row():
                interrupted = gr.Dropdown([], label="interrupted runs", allow_custom_value=True, elem_id="interrupted")
                resume = gr.Button("Resume", elem_id="resume")
            progress = gr.Markdown("no training yet", elem_id="progress")
            samples = gr.Gallery(label="sample grids", columns=4, elem_id="samples")
            log = gr.Textbox(label="log", lines=4, max_lines=12)

        with gr.Tab("Generate"):
            with gr.Row():
                gen_runs = gr.Dropdown([], multiselect=True, allow_custom_value=True, label="finished runs",
                                       elem_id="gen-runs")
                weights = gr.Textbox(label="adapter weights (one per run, e.g. 0.7,0.5)", placeholder="1 each")
            prompt = gr.Textbox("a {token} {class} on the beach", label="prompt ({token} and {class} fill in)",
                                elem_id="prompt")
            negative = gr.Textbox(label="negative prompt")
            with gr.Row():
                seed = gr.Number(0, label="first seed", precision=0)
                n = gr.Slider(1, 16, 4, step=1, label="images", elem_id="n-images")
                gen_steps = gr.Number(25, label="steps", precision=0, elem_id="gen-steps")
                guidance = gr.Number(7.5, label="guidance")
                gen_res = gr.Number(0, label="resolution (0: the run's)", precision=0)
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="images", columns=4, format="png", elem_id="gallery",
                                 buttons=["download", "download_all", "fullscreen"])
            gen_info = gr.Markdown(elem_id="gen-info")
            archive = gr.File(label="all images (zip)")

        with gr.Tab("Runs"):
            refresh = gr.Button("Refresh")
            table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, elem_id="runs")
            pick = gr.Dropdown([], label="run", allow_custom_value=True)
            with gr.Row():
                grid = gr.Image(label="validation grid", type="filepath")
                details = gr.Code(label="run.json", language="json", interactive=False)
            with gr.Row():
                fmt = gr.Dropdown(export_formats(), value="kohya", label="export format")
                exp_over = gr.Checkbox(False, label="overwrite")
                export = gr.Button("Export")
            exported = gr.File(label="exported file")
            exp_msg = gr.Markdown()
            with gr.Row():
                dino = gr.Textbox(DEFAULT_DINO, label="DINO model")
                clip = gr.Textbox(DEFAULT_CLIP, label="CLIP model")
                ipp = gr.Number(4, label="images per prompt", precision=0)
                eval_steps = gr.Number(0, label="steps (0: generation's)", precision=0)
                evaluate = gr.Button("Evaluate")
            eval_msg = gr.Markdown()

        train_inputs = [name, base, source, subject, photos, class_noun, method, steps, resolution, lr, rank, prior,
                        class_images, sample_every, overwrite, pivotal]
        listing = [table, gen_runs, pick, interrupted]
        photos.change(app.check_photos, [photos, base, resolution], [thumbs, photo_msg], api_name="check_photos")
        for c in (base, resolution):  # the size check depends on both
            c.change(app.check_photos, [photos, base, resolution], [thumbs, photo_msg], api_name=False)
        start.click(app.train, train_inputs, [progress, samples, log], api_name="train", **LONG).then(
            app.runs_table, None, listing, api_name=False)
        resume.click(app.resume, [interrupted], [progress, samples, log], api_name="resume", **LONG).then(
            app.runs_table, None, listing, api_name=False)
        cancel.click(app.cancel, None, [progress], api_name="cancel", concurrency_limit=None)
        go.click(app.generate, [gen_runs, weights, prompt, negative, seed, n, gen_steps, guidance, gen_res],
                 [gallery, archive, gen_info], api_name="generate", **LONG)
        refresh.click(app.runs_table, None, listing, api_name="runs", concurrency_limit=None)
        pick.change(app.run_details, [pick], [grid, details], api_name="run_details")
        export.click(app.export, [pick, fmt, exp_over], [exported, exp_msg], api_name="export", **LONG).then(
            app.runs_table, None, listing, api_name=False)
        evaluate.click(app.evaluate, [pick, dino, clip, ipp, eval_steps], [eval_msg], api_name="evaluate", **LONG).then(
            app.runs_table, None, listing, api_name=False)
        demo.load(app.runs_table, None, listing, api_name=False)
        demo.load(app.watch, None, [progress, samples, log], api_name="watch", concurrency_limit=None)
    return demo
