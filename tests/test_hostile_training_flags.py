"""Issue 25 on the method flags (lora, dora, loha, lokr, oft, full) and the in-run steering flags
(--sample-every, --save-every, --score-every and their inputs): a bad value is one line
`error: <flag ...>: <why>` on stderr, exit 2, before any model is loaded or anything written (the
run dir is never created), and no library warning beside it."""

from __future__ import annotations

import warnings

import pytest

from conftest import FAST

QUICK = [*FAST, "--steps", "1", "--class-images", "0", "--validation-images", "0"]
METHODS = ["lora", "dora", "loha", "lokr", "oft", "full"]
RANKED = ["lora", "dora", "loha", "lokr"]  # the methods --rank and --text-encoder-rank size


@pytest.fixture(scope="module")
def dog(tmp_path_factory):
    from conftest import write_photos

    return write_photos(tmp_path_factory.mktemp("flags") / "dog", n=3, size=(64, 64))


def refused(cli, tmp_path, dog, method, culprit, *flags) -> str:
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = cli(method, "--subject", dog, "--class-noun", "dog", *QUICK, "--output-dir", out, *map(str, flags))
    lines = r.err.strip().splitlines()
    assert r.code == 2, r.err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.err, r.err
    assert culprit in lines[0], (culprit, lines[0])
    assert not out.exists()
    # a library's warning would print beside the line on a real terminal
    assert not [w for w in seen if issubclass(w.category, UserWarning)], [str(w.message) for w in seen]
    return lines[0]


# ---------------------------------------------------------------------------- methods x out-of-range flags
OUT_OF_RANGE = [
    # (methods, flags, the culprit the line names)
    (METHODS, ["--rank", "0"], "--rank"),
    (METHODS, ["--rank", "-4"], "--rank"),
    (METHODS, ["--text-encoder-rank", "0"], "--text-encoder-rank"),
    (METHODS, ["--lora-alpha", "-1"], "--lora-alpha"),
    (METHODS, ["--lora-alpha", "nan"], "--lora-alpha"),
    (METHODS, ["--text-encoder-alpha", "0"], "--text-encoder-alpha"),
    # above the full rank of every targeted layer (tiny's widths are 32 and 64): parameters, not
    # capacity; 10^8 allocates ~13 GB a layer, an out-of-memory kill mid-run
    (RANKED, ["--rank", "4096"], "--rank 4096"),
    (RANKED, ["--text-encoder-rank", "4096"], "--text-encoder-rank 4096"),
    (RANKED, ["--lora-targets", ","], "--lora-targets"),
    (RANKED, ["--lora-targets", "no_such_layer"], "no_such_layer"),
    (["lora"], ["--lora-text-encoder-targets", " , "], "--lora-text-encoder-targets"),
    (["lokr"], ["--lokr-factor", "0"], "--lokr-factor"),
    (["lokr"], ["--lokr-factor", "-2"], "--lokr-factor"),
    # peft takes a factor that does not divide a width and quietly uses another one
    (["lokr"], ["--lokr-factor", "7"], "--lokr-factor 7"),
    (["lokr"], ["--lokr-factor", "100000"], "--lokr-factor 100000"),
    (["oft"], ["--oft-block-size", "0"], "--oft-block-size"),
    # peft adjusts it with a UserWarning that printed above the line
    (["oft"], ["--oft-block-size", "7"], "--oft-block-size 7"),
    (["oft"], ["--oft-block-size", "100000"], "--oft-block-size 100000"),
]
CASES = [(m, flags, culprit) for methods, flags, culprit in OUT_OF_RANGE for m in methods]


@pytest.mark.parametrize("method, flags, culprit", CASES, ids=[f"{m}:{' '.join(f)}" for m, f, _ in CASES])
def test_an_out_of_range_method_flag_is_one_line(cli, tmp_path, dog, method, flags, culprit):
    refused(cli, tmp_path, dog, method, culprit, *flags)


# ---------------------------------------------------------------------------- steering x bad file / out of range
@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "empty.txt").write_text("\n# only a comment\n")
    (d / "latin1.txt").write_bytes("un {token} {class} au caf\xe9\n".encode("latin-1"))
    (d / "folder").mkdir()
    (d / "good.txt").write_text("a {token} {class} on the moon\n")
    return d


@pytest.mark.parametrize("steer", ["--sample-every", "--save-every", "--score-every"])
@pytest.mark.parametrize("bad, why", [("empty.txt", "no prompts"), ("latin1.txt", "not UTF-8"),
                                      ("folder", "not a regular file"), ("missing.txt", "no such file")])
def test_a_bad_sample_prompts_file_is_one_line(cli, tmp_path, dog, prompt_files, steer, bad, why):
    extra = [] if steer == "--sample-every" else ["--sample-every", "1"]
    line = refused(cli, tmp_path, dog, "lora", f"--sample-prompts {prompt_files / bad}", steer, "1", *extra,
                   "--sample-prompts", prompt_files / bad)
    assert why in line


def test_sample_prompts_without_sample_every_is_one_line(cli, tmp_path, dog, prompt_files):
    """A good prompts file that nothing would draw: certainly a mistake (--save-every or
    --score-every do not use it)."""
    for steer in ([], ["--save-every", "1"], ["--score-every", "1"]):
        refused(cli, tmp_path, dog, "lora", "--sample-every", "--sample-prompts", prompt_files / "good.txt", *steer)


def test_score_every_without_the_evaluators_is_one_line(cli, tmp_path, dog):
    refused(cli, tmp_path, dog, "lora", "--dino", "--score-every", "1")  # offline: DINO is not in the HF cache
    refused(cli, tmp_path, dog, "lora", f"--dino {tmp_path / 'none'}", "--score-every", "1", "--dino", tmp_path / "none")


@pytest.mark.parametrize("flags, culprit", [
    (["--sample-every", "-1"], "--sample-every"),
    (["--save-every", "-2"], "--save-every"),
    (["--score-every", "-1"], "--score-every"),
    (["--score-every", "1", "--score-prompts", "0"], "--score-prompts"),
    (["--score-every", "1", "--score-images", "0"], "--score-images"),
    (["--min-clip-t", "nan"], "--min-clip-t"),
    (["--min-clip-t", "1.5"], "--min-clip-t"),
    (["--sample-every", "x"], "--sample-every"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_an_out_of_range_steering_flag_is_one_line(cli, tmp_path, dog, flags, culprit):
    refused(cli, tmp_path, dog, "lora", culprit, *flags)
