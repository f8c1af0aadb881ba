"""The app's workspace: the one folder everything the app writes goes into, and the checks that
keep it there. Names from the browser (run names, uploaded file names) never become paths
unchecked: a run name is one plain folder name; a run picked from a list is looked up by its path
relative to `runs/` and must resolve inside it (no `..`, no absolute path, no symlink out);
uploaded photos are copied under names the app makes, after each is read with the CLI's own
checks (`data.load_training_images`), so a bad file is refused with the CLI's message.

    WORKSPACE/runs/<name>/          run dirs (`personalize lora/full` outputs; CLI runs below too)
    WORKSPACE/uploads/<name>/       the photos a run of own photos trains on
    WORKSPACE/exports/              kohya files and merged pipelines
    WORKSPACE/.app/jobs/<name>.json the TrainConfig of each run the app started (for Resume)
    WORKSPACE/.app/gradio/          Gradio's upload and file cache
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_dir, write_json

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_PHOTOS = 3  # DreamBooth trains on 3-5 photos of a subject (Ruiz et al. 2023, section 4.1)
MAX_PHOTOS = 20  # more adds little and only slows caching; the 3-20
MAX_PHOTO_MB = 25  # a 48 MP phone JPEG is ~15 MB; a bigger "photo" is a RAW file or a mistake
UPLOAD_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def check_name(name: str, what: str = "run name") -> str:
    """A run name is one folder name: letters, digits, `._-`, not starting with a dot or dash."""
    name = (name or "").strip()
    if not NAME.match(name) or ".." in name:
        raise UserError(f"{what} '{name}': use 1-64 letters, digits, '.', '_' or '-' (not starting with '.' "
                        f"or '-'); it names a folder in the workspace, not a path")
    return name


def inside(root: Path, path: Path) -> bool:
    root, path = os.path.realpath(root), os.path.realpath(path)
    return path == root or path.startswith(root + os.sep)


@dataclass
class Photo:
    source: Path  # the uploaded temp file
    name: str  # the name the browser gave it (shown, never used as a path)


class Workspace:
    def __init__(self, root: Path, max_photo_mb: float = MAX_PHOTO_MB):
        self.root = Path(root).expanduser().resolve()
        self.max_photo_mb = max_photo_mb
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.runs, self.uploads, self.exports, self.jobs):
            d.mkdir(parents=True, exist_ok=True)

    runs = property(lambda self: self.root / "runs")
    uploads = property(lambda self: self.root / "uploads")
    exports = property(lambda self: self.root / "exports")
    jobs = property(lambda self: self.root / ".app" / "jobs")
    gradio_cache = property(lambda self: self.root / ".app" / "gradio")

    def contained(self, path: Path, what: str) -> Path:
        if not inside(self.root, path):
            raise UserError(f"{what} {path}: outside the workspace {self.root}")
        return Path(path)

    def new_run_dir(self, name: str) -> Path:
        return self.contained(self.runs / check_name(name), "run")

    def run_dir(self, rel: str) -> Path:
        """A run picked by its path relative to runs/ (as the app lists it): each part a plain
        name, the whole inside runs/ after symlinks are followed."""
        rel = (rel or "").strip()
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(not NAME.match(p) or ".." in p for p in parts):
            raise UserError(f"run '{rel}': not a run of this workspace (runs are named by their folder under "
                            f"{self.runs})")
        path = self.runs.joinpath(*parts)
        if not inside(self.runs, path):
            raise UserError(f"run '{rel}': its folder leads outside the workspace")
        if not path.is_dir():
            raise UserError(f"run '{rel}': no such run in {self.runs}")
        return path

    def rel(self, run_dir: Path) -> str:
        return Path(run_dir).relative_to(self.runs).as_posix()

    # ---------------------------------------------------------------- job records (for Resume)
    def job_path(self, name: str) -> Path:
        return self.jobs / f"{check_name(name)}.json"

    def save_job(self, name: str, config: dict) -> Path:
        return write_json(self.job_path(name), {"config": config})

    def load_job(self, name: str) -> dict | None:
        try:
            return json.loads(self.job_path(name).read_text())["config"]
        except (OSError, ValueError, KeyError, UserError):
            return None

    # ---------------------------------------------------------------- photos
    def check_photos(self, photos: list[Photo], resolution: int) -> tuple[list[Photo], list[str]]:
        """(accepted, one message per refused file). Each file is read with the CLI's checks (it
        decodes fully, EXIF orientation applied, at least `resolution` px on its short side)."""
        from ..data import load_training_images

        if len(photos) > MAX_PHOTOS:
            raise UserError(f"{len(photos)} photos: at most {MAX_PHOTOS} per run (DreamBooth needs 3-5)")
        good, bad = [], []
        for ph in photos:
            src = Path(ph.source)
            suffix = Path(ph.name).suffix.lower()
            try:
                if suffix not in UPLOAD_SUFFIXES:
                    raise UserError(f"{ph.name}: not an image file name (looked for "
                                    f"{', '.join(sorted(UPLOAD_SUFFIXES))})")
                size = src.stat().st_size
                if size > self.max_photo_mb * 2**20:
                    raise UserError(f"{ph.name}: {size / 2**20:.1f} MB; a photo is at most {self.max_photo_mb:g} MB")
                load_training_images([src], resolution)
            except UserError as e:
                # the CLI's message, naming the file as the user knows it rather than Gradio's temp copy
                bad.append(str(e).replace(str(src), ph.name))
                continue
            good.append(ph)
        return good, bad

    def store_photos(self, name: str, photos: list[Photo]) -> Path:
        """Copy accepted photos into uploads/<name>/ as 00.jpg, 01.png, ... (names the app makes)."""
        if len(photos) < MIN_PHOTOS:
            raise UserError(f"{len(photos)} usable photo(s): DreamBooth needs at least {MIN_PHOTOS} (3-5 is the "
                            f"paper's number, at most {MAX_PHOTOS})")
        dest = self.contained(self.uploads / check_name(name), "uploads")
        with atomic_dir(dest, replace=True) as tmp:  # a new set of photos replaces the old one whole
            for i, ph in enumerate(photos):
                shutil.copyfile(ph.source, tmp / f"{i:02d}{Path(ph.name).suffix.lower()}")
        return dest


def thumbnail(path: Path, size: int = 192):
    """A small RGB copy with EXIF orientation applied (what training will see, uncropped)."""
    from ..data import open_image

    img = open_image(Path(path))
    img.thumbnail((size, size))
    return img
