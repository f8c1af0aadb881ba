"""The package's shape, held against its imports (read with `ast`; nothing is imported).

LAYERS is the one place the layers are declared: a module imports only modules of its own layer
or of the layers below (module-level and function-local imports alike), there are no import
cycles, and personalize never imports distill. A function-local import of a project module is for
start-up time only: it must defer a module that loads a heavy library (torch, diffusers, gradio,
...), never a light one, so that no lazy import can hide a cycle. docs/ARCHITECTURE.md describes
the layers in words.
"""

from __future__ import annotations

import ast

import pytest

from _import_graph import ROOT, cycles, heavy_at_import, import_graph, source_files

# layer -> module prefixes (dotted); the longest matching prefix decides a module's layer
LAYERS: dict[int, tuple[str, ...]] = {
    # 1. core: no model code; what every layer above shares
    1: ("personalize.errors", "personalize.defaults", "personalize.fileio", "personalize.outputs",
        "personalize.extras", "personalize.argtypes", "personalize.flags", "personalize.settings", "personalize.card",
        "personalize.clock", "personalize.host_memory", "personalize.forwards",
        "personalize"),
    # 2. models and data: one concern each, none of them knows about runs
    2: ("personalize.backbones", "personalize.architectures", "personalize.cost", "personalize.pipeline",
        "personalize.adapters", "personalize.peft_adapters", "personalize.diffusion", "personalize.data",
        "personalize.subjects", "personalize.precision", "personalize.checkpoints", "personalize.runtimes",
        "personalize.half_storage", "personalize.quantize", "personalize.environment", "personalize.buckets",
        "personalize.captions", "personalize.embeddings", "personalize.gemm_convs",
        "personalize.attention_backward", "personalize.orthogonal_inputs"),
    # 3. finished runs on disk, and the one owner of resolving and loading any model source
    3: ("personalize.runs", "personalize.sources"),
    # 4. what a finished run or a base is used for
    4: ("personalize.generate", "personalize.images", "personalize.export", "personalize.class_images",
        "personalize.class_images_openvino", "personalize.evaluation"),
    # 5. training: the typed config, the one fit loop, in-run monitoring, the DreamBooth orchestrator
    5: ("personalize.config", "personalize.fit", "personalize.monitor", "personalize.objective",
        "personalize.text_cache", "personalize.ema", "personalize.prior", "personalize.prepare",
        "personalize.pivotal", "personalize.dreambooth"),
    # 6. many runs: batch; the distillation recipes, on top of everything personalize offers below
    6: ("personalize.batch", "distill"),
    # 7. front-ends, no logic: the CLIs, their commands, the app
    7: ("personalize.cli", "personalize.commands", "personalize.app", "personalize.__main__", "distill.cli",
        "distill.__main__"),
}


def layer_of(module: str) -> int | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    return best[0] if best else None


def upward(edges) -> list:
    return [e for e in edges if (layer_of(e.dst) or 0) > (layer_of(e.src) or 0)]


def gratuitous_local(edges) -> list:
    heavy = heavy_at_import()
    return [e for e in edges if e.local and e.dst not in heavy]


@pytest.fixture(scope="module")
def edges():
    return import_graph()


def test_every_module_has_a_layer():
    assert [m for m in source_files() if layer_of(m) is None] == []


def test_no_import_cycles(edges):
    assert cycles(edges) == []


def test_imports_follow_the_layers(edges):
    assert [str(e) for e in upward(edges)] == []


def test_personalize_never_imports_distill(edges):
    assert [str(e) for e in edges if e.src.startswith("personalize") and e.dst.startswith("distill")] == []


def test_lazy_imports_only_defer_heavy_modules(edges):
    assert [str(e) for e in gratuitous_local(edges)] == []


def test_an_injected_upward_import_or_cycle_fails():
    """The checks above see a module-level and a function-local import the moment one is added."""
    errors = (ROOT / "personalize" / "errors.py").read_text()
    up = import_graph(overrides={"personalize.errors": errors + "\nfrom .cli import main\n"})
    assert [str(e) for e in upward(up) if e.src == "personalize.errors"] == ["personalize.errors:%d -> personalize.cli" % (len(errors.splitlines()) + 2)]
    assert any("personalize.errors" in c and "personalize.cli" in c for c in cycles(up))
    lazy = import_graph(overrides={"personalize.errors": errors + "\ndef f():\n    from .generate import plan\n"})
    assert [str(e) for e in upward(lazy) if e.src == "personalize.errors"] == ["personalize.errors:%d -> personalize.generate (function-local)"
                                              % (len(errors.splitlines()) + 3)]


def test_no_file_over_450_lines():
    assert {m: n for m, p in source_files().items() if (n := len(p.read_text().splitlines())) > 450} == {}


def _importers(target: str) -> set[str]:
    return {str(source_files()[e.src].relative_to(ROOT)) for e in import_graph() if e.dst == target}


def _third_party_imports(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_only_the_front_ends_and_batch_import_the_orchestrator():
    # the app's training process is a front-end like the CLI (personalize app)
    assert {f for f in _importers("personalize.dreambooth")} <= {
        "personalize/batch/run.py", "personalize/commands/dreambooth.py", "personalize/app/worker.py"}


def test_only_fit_touches_the_accelerator():
    users = {str(p.relative_to(ROOT)) for m, p in source_files().items()
             if {"accelerate", "accelerate.Accelerator"} & _third_party_imports(p)}
    assert users <= {"personalize/fit.py", "personalize/pipeline.py"}  # pipeline: accelerate's meta-device loader
    assert {str(p.relative_to(ROOT)) for m, p in source_files().items()
            if "accelerate.Accelerator" in _third_party_imports(p)} == {"personalize/fit.py"}


def test_data_modules_import_no_models():
    for mod in ("personalize/data.py", "personalize/subjects.py", "personalize/runs.py", "personalize/fileio.py"):
        names = _third_party_imports(ROOT / mod)
        assert not {n for n in names if n.split(".")[0] in {"diffusers", "transformers", "peft"}}, mod


def test_temp_then_rename_lives_in_fileio():
    offenders = []
    for m, path in source_files().items():
        if path.name == "fileio.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {"mkstemp", "mkdtemp"}:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
