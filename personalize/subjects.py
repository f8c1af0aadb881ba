"""The 30 DreamBooth subjects, their evaluation prompts, where their photos are, and the one reader
of a user's prompts file (`generate --prompts`, `--sample-prompts`, `distill eval --prompts`).

Data files ship in the wheel under personalize/_data (see pyproject) and sit at the repo's top level
(`subjects/`, `prompts/`) in a checkout; both places are searched. No model imports here.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import os
import stat
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError
from .fileio import scratch_dir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
DEFAULT_DATA_DIR = Path("data/dreambooth/dataset")
DATASET_ZIP_URL = "https://github.com/google/dreambooth/archive/refs/heads/main.zip"
# DreamBooth used "sks"; it is a rare token for CLIP's BPE, and what the BK-SDM scripts use.
DEFAULT_TOKEN = "sks"


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    kind: str  # "live" (dogs, cats: the live-subject prompt set) or "object"
    image_dir: Path | None = None  # None until located on disk

    def to_json(self) -> dict:
        d = asdict(self)
        d["image_dir"] = str(self.image_dir) if self.image_dir else None
        return d


def _data_file(kind: str, name: str) -> Path:
    here = Path(__file__).resolve().parent
    for root in (here / "_data" / kind, here.parent / kind):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{kind}/{name} is missing from the installation")


def load_subjects() -> dict[str, Subject]:
    with _data_file("subjects", "subjects.csv").open(newline="") as f:
        return {r["name"]: Subject(r["name"], r["class_noun"], r["kind"]) for r in csv.DictReader(f)}


def load_prompts(kind: str) -> list[str]:
    """The 25 DreamBooth evaluation prompt templates for `kind` ("live" or "object"),
    with `{token}` and `{class}` placeholders."""
    lines = _data_file("prompts", f"{kind}.txt").read_text().splitlines()
    return [ln for ln in lines if ln.strip() and not ln.startswith("#")]


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n and not n % 2**20 else f"{n} bytes"


def read_prompts_text(path: str | Path, flag: str, max_bytes: int, what: str = "a prompts file") -> str:
    """The UTF-8 text of a user's prompts file (a leading byte-order mark, as Notepad writes, is not
    part of it), or a one-line UserError naming `flag` and the file: no such file, not a regular
    file (a folder, /dev/zero, a FIFO), over `max_bytes` (a larger "prompts file" is a wrong path:
    a log, a dataset), not UTF-8. `what` names the kind of file in the size refusal."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: unreadable (no such file)") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: unreadable ({type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{flag} {path}: not a regular file")
    if st.st_size > max_bytes:
        raise UserError(f"{flag} {path}: {st.st_size} bytes; {what} is at most {_size(max_bytes)}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since the stat
    except OSError as e:
        raise UserError(f"{flag} {path}: unreadable ({type(e).__name__})") from None
    if len(data) > max_bytes:
        raise UserError(f"{flag} {path}: more than {max_bytes} bytes; {what} is at most {_size(max_bytes)}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path}: unreadable (not UTF-8 text)") from None


def read_prompts_file(path: str | Path, flag: str, max_bytes: int = 1 << 20, comments: bool = True) -> list[str]:
    """A user's prompts file: one prompt per line, stripped, blank lines and (with `comments`) lines
    starting with `#` skipped; `{token}`/`{class}` left for the caller. Refusals as
    `read_prompts_text`; an empty list is the caller's to refuse or not."""
    lines = read_prompts_text(path, flag, max_bytes).splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not (comments and ln.lstrip().startswith("#"))]


def fill_prompt(template: str, token: str, class_noun: str) -> str:
    return template.replace("{token}", token).replace("{class}", class_noun)


def list_images(folder: Path) -> list[Path]:
    """The photos of a folder; `photo.mask.png` files are the masks of photos, not photos."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.lower().endswith(".mask.png"))


def check_links(folder: Path) -> None:
    """A photo that is a symlink to nowhere would be silently left out (`list_images` sees no file):
    refused, naming it. A symlink to a photo elsewhere is a photo."""
    for p in sorted(Path(folder).iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_symlink() and not p.exists():
            raise UserError(f"{p}: a broken symlink (its target {os.readlink(p)} does not exist)")


def data_dir(flag: str | None) -> tuple[Path, bool]:
    """(dataset dir, whether it is the default place). Order: --data-dir, $PERSONALIZE_DATA, default."""
    if flag:
        return Path(flag).expanduser(), False
    env = os.environ.get("PERSONALIZE_DATA")
    if env:
        return Path(env).expanduser(), False
    return DEFAULT_DATA_DIR, True


class DatasetMissing(UserError):
    """The default dataset folder is absent (`find_subject(fetch=False)`): fetching it is up to the caller."""


def find_subject(subject: str, data_dir_flag: str | None = None, class_noun: str | None = None,
                 fetch: bool = True) -> Subject:
    """Resolve `--subject`: a dataset subject name, or a folder of the user's own photos."""
    p = Path(subject).expanduser()
    known = load_subjects()
    if subject not in known and (p.is_dir() or os.sep in subject or subject.startswith(".")):
        if not p.is_dir():
            raise UserError(f"--subject {subject}: no such folder")
        if not class_noun:
            raise UserError(f"--subject {subject} is a folder of your own photos: say what it is with --class-noun (e.g. dog)")
        if not list_images(p):
            raise UserError(f"--subject {subject}: no images in that folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        check_links(p)
        kind = "live" if class_noun in {"dog", "cat"} else "object"
        return Subject(p.name, class_noun, kind, p.resolve())
    if subject not in known:
        close = difflib.get_close_matches(subject, list(known), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `personalize subjects` lists them"
        raise UserError(f"unknown subject '{subject}'{hint} (or pass a folder of photos with --class-noun)")
    s = known[subject]
    root, is_default = data_dir(data_dir_flag)
    if not root.is_dir():
        if is_default and fetch:
            fetch_dataset(root)
        elif is_default:
            raise DatasetMissing(f"the DreamBooth photos are not in {root} yet")
        else:
            raise UserError(f"data dir {root} does not exist; clone the DreamBooth dataset repository and pass its "
                            f"dataset/ folder with --data-dir (or set PERSONALIZE_DATA)")
    folder = root / s.name
    if not folder.is_dir():
        raise UserError(f"subject '{s.name}' has no folder in {root}; is that the DreamBooth dataset/ folder?")
    if not list_images(folder):
        raise UserError(f"{folder}: no images in the subject's folder")
    check_links(folder)
    return Subject(s.name, class_noun or s.class_noun, s.kind, folder.resolve())


def fetch_dataset(dest: Path, url: str = DATASET_ZIP_URL, timeout: float = 10.0) -> Path:
    """Download the public DreamBooth dataset once into `dest` (its `dataset/` folder), with progress.
    Offline: one line saying where to put it."""
    import urllib.request

    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    dest = Path(dest)
    where = (f"clone the DreamBooth dataset repository and put its dataset/ folder at {dest}, "
             f"or pass --data-dir / set PERSONALIZE_DATA")
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("PERSONALIZE_OFFLINE"):
        raise UserError(f"no DreamBooth photos found and offline mode is set; {where}")
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    ok = False
    try:
        with scratch_dir(dest) as tmpdir:
            try:
                resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed https URL
            except OSError as e:
                raise UserError(f"no DreamBooth photos found and the download failed ({e.__class__.__name__}); "
                                f"{where}") from None
            total = int(resp.headers.get("Content-Length") or 0) or None
            zpath = tmpdir / "dreambooth.zip"
            with Progress("[bold]fetching DreamBooth dataset", BarColumn(), DownloadColumn(), TransferSpeedColumn()) as bar, \
                    zpath.open("wb") as f:
                task = bar.add_task("download", total=total)
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(task, advance=len(chunk))
            with zipfile.ZipFile(zpath) as z:
                z.extractall(tmpdir / "x")
            found = next((p for p in (tmpdir / "x").glob("*/dataset") if p.is_dir()), None)
            if found is None:
                raise UserError(f"downloaded archive has no dataset/ folder; {where}")
            found.rename(dest)
            ok = True
    finally:
        if not ok:  # a failed fetch leaves no empty data/dreambooth/ behind
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
    return dest


def photos_present(root: Path, name: str) -> bool:
    folder = Path(root) / name
    return folder.is_dir() and bool(list_images(folder))
