"""Start-up: `--help` and the light commands import no ML library; the version check turns a
known-bad combination into one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")


@pytest.mark.parametrize("argv", [["--help"], ["lora", "--help"], ["generate", "--help"], ["batch", "--help"],
                                  ["subjects"], ["backbones"], ["lora", "--subject", "dog", "--steps", "x"]])
def test_light_commands_import_no_ml_library(argv):
    code = ("import sys, runpy\n"
            f"sys.argv = ['personalize', *{argv!r}]\n"
            "try:\n    from personalize.cli import main; rc = main()\n"
            "except SystemExit as e:\n    rc = e.code\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]


def test_known_bad_pair_is_one_line_and_exit_2(monkeypatch, capsys):
    from personalize import environment
    from personalize.cli import main

    bad = environment.KnownBad("transformers", ">=0", "peft", ">=0", "a faked incompatibility",
                               "'peft==9.9'")
    monkeypatch.setattr(environment, "KNOWN_BAD", [bad])
    assert main(["generate", "--prompt", "x", "--base", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: transformers ") and "peft" in err[0]
    assert "pip install 'peft==9.9'" in err[0] and "Traceback" not in err[0]


def test_version_outside_the_range_warns(monkeypatch):
    import io

    from personalize import environment

    real = environment.installed
    monkeypatch.setattr(environment, "installed", lambda n: "0.0.1" if n == "diffusers" else real(n))
    errors, warnings = environment.problems([])
    assert not errors
    assert [w for w in warnings if w.startswith("diffusers 0.0.1 is outside the supported range")]
    buf = io.StringIO()
    environment.check([], stream=buf)
    assert buf.getvalue().startswith("warning: diffusers 0.0.1")


def test_missing_dependency_is_an_error(monkeypatch):
    from personalize import environment

    real = environment.installed
    monkeypatch.setattr(environment, "installed", lambda n: None if n == "peft" else real(n))
    errors, _ = environment.problems([])
    assert errors and errors[0].startswith("peft is not installed")


@pytest.mark.smoke
def test_env_lists_the_stack(cli):
    r = cli("env")
    assert r.code == 0
    names = [line.split()[0] for line in r.out.splitlines()]
    assert {"personalize", "torch", "diffusers", "transformers", "peft", "check"} <= set(names)
    assert "ok: every dependency" in r.out


def test_version_flag(cli, capsys):
    from personalize import __version__
    from personalize.cli import main

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"personalize {__version__}"


def test_a_recorded_known_bad_pair_is_caught(monkeypatch):
    """The shipped list, not a fake: peft 0.18 under transformers 5 is refused with the fix."""
    from personalize import environment

    real = environment.installed
    monkeypatch.setattr(environment, "installed", lambda n: "0.18.0" if n == "peft" else real(n))
    errors, _ = environment.problems()
    assert errors and errors[0].startswith("peft 0.18.0 with transformers 5.")
    assert "pip install 'peft>=0.19" in errors[0]
