"""Layering the package relies on: the DreamBooth orchestrator is imported only by the CLI and
batch; data never imports models; one module touches the Accelerator; atomic writes live in fileio."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("personalize", "distill")


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text())


def _imports(tree, path):
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base
            for a in node.names:
                yield f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _importers(target: str) -> set[str]:
    out = set()
    for path, tree in _modules():
        if any(name == target for name in _imports(tree, path)):
            out.add(str(path.relative_to(ROOT)))
    return out


def test_only_the_cli_and_batch_import_the_orchestrator():
    # the app's training process is a front-end like the CLI (personalize app)
    assert _importers("personalize.dreambooth") == {"personalize/batch.py", "personalize/commands/dreambooth.py",
                                                    "personalize/app/worker.py"}


def test_only_fit_touches_the_accelerator():
    assert _importers("accelerate") | _importers("accelerate.Accelerator") <= {"personalize/fit.py",
                                                                              "personalize/pipeline.py"}
    assert _importers("accelerate.Accelerator") == {"personalize/fit.py"}


def test_data_modules_import_no_models():
    for mod in ("personalize/data.py", "personalize/subjects.py", "personalize/runs.py", "personalize/fileio.py"):
        tree = ast.parse((ROOT / mod).read_text())
        names = set(_imports(tree, ROOT / mod))
        assert not {n for n in names if n.split(".")[0] in {"diffusers", "transformers", "peft"}}, mod


def test_temp_then_rename_lives_in_fileio():
    offenders = []
    for path, tree in _modules():
        if path.name == "fileio.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in {"mkstemp", "mkdtemp"}:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
