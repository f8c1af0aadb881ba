"""The package's import graph, read from the source with `ast` (nothing is imported): every
`import` and `from ... import` of a project module, at module level or inside a function, with
the line it is on. tests/test_structure.py holds the graph against the declared layers."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("personalize", "distill")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, dotted (personalize.generate)
    dst: str  # imported project module, dotted
    line: int
    local: bool  # inside a function (a lazy import), not at module level
    names: tuple[str, ...] = ()  # what a `from` import takes

    def __str__(self) -> str:
        return f"{self.src}:{self.line} -> {self.dst}{' (function-local)' if self.local else ''}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest project module that `name` (module or module.attribute) names."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _walk(node: ast.AST, local: bool = False):
    for child in ast.iter_child_nodes(node):
        inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        yield from _walk(child, inner)


def edges_of(module: str, source: str, modules: set[str], is_package: bool = False) -> list[Edge]:
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node, local in _walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                dst = _resolve(a.name, modules)
                if dst and dst != module:
                    out.append(Edge(module, dst, node.lineno, local))
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        for a in node.names:
            # `from pkg import mod` imports the submodule; `from mod import name` the module
            dst = _resolve(f"{base}.{a.name}", modules) or _resolve(base, modules)
            if dst and dst != module:
                out.append(Edge(module, dst, node.lineno, local, (a.name,)))
    return out


def import_graph(root: Path = ROOT, overrides: dict[str, str] | None = None) -> list[Edge]:
    """Every project import of the packages under `root`; `overrides` maps a module to source text
    that replaces its file (a test injects an import this way)."""
    files = source_files(root)
    modules = set(files)
    edges = []
    for mod, path in files.items():
        text = (overrides or {}).get(mod) or path.read_text()
        edges += edges_of(mod, text, modules, path.name == "__init__.py")
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# what makes `--help` slow: importing any of these costs from a tenth of a second (rich, numpy)
# to several seconds (torch, diffusers, gradio)
HEAVY = {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub", "numpy",
         "PIL", "rich", "datasets", "bitsandbytes", "openvino", "onnx", "onnxruntime", "nncf", "coremltools",
         "gradio", "gradio_client", "torchmetrics", "lycoris", "prodigyopt", "matplotlib", "scipy", "tensorboard"}


def heavy_at_import(root: Path = ROOT) -> set[str]:
    """Project modules whose import (module-level statements, followed through project modules)
    loads a HEAVY library: the ones a lazy import may defer."""
    files = source_files(root)
    modules = set(files)
    direct: dict[str, bool] = {}
    deps: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        heavy, own = False, set()
        for node, local in _walk(tree):
            if local:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            heavy |= any(n.split(".")[0] in HEAVY for n in names)
        own = {e.dst for e in edges_of(mod, path.read_text(), modules, path.name == "__init__.py") if not e.local}
        # a submodule import runs its package's __init__ too
        own |= {p for p in (mod.rpartition(".")[0],) if p in modules}
        direct[mod], deps[mod] = heavy, own
    out: set[str] = set()
    changed = True
    while changed:
        changed = False
        for mod in modules - out:
            if direct[mod] or deps[mod] & out:
                out.add(mod)
                changed = True
    return out
