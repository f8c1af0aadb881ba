"""Any run as a plain LoRA (`export --format lora`), and a LoRA run at another rank.

kohya's sd-scripts do both: `networks/extract_lora_from_models.py` keeps a truncated SVD of the
difference of two models' weights, `networks/resize_lora.py` one of each B A of a LoRA. Here, per
Linear/Conv2d weight:

- a LoRA run: dW = (alpha/r) B A, factored (QR of B and of A^T, then the SVD of the small r x r
  core: exact, and no base is loaded);
- a DoRA, LoHa, LoKr, OFT, BOFT or HRA run: dW = W' - W, each adapted layer merged by peft on the
  run's own base (magnitudes, Hadamard and Kronecker products and rotations are not a B A);
- a full run: dW = W_run - W_base of every Linear/Conv2d weight that changed (the base named in
  run.json); what no LoRA carries (biases, norms, embeddings) is counted in the report.

Conv weights are flattened to (out, in*kh*kw) as kohya does: down becomes a kh x kw conv to k
channels, up a 1x1 conv. k is `rank` (capped by the weight's own rank), or the smallest rank that
keeps `energy` of the squared singular values (with both: the smaller of the two). up = U_k S_k,
down = V_k^T, alpha = k (scale 1). Each module's relative error ||dW - up down||_F / ||dW||_F and
the total over all of them go into export.json ("format": "lora"). The output folder is a LoRA
run (`pytorch_lora_weights.safetensors` in the diffusers format, per-module ranks in its metadata,
and a run.json), so `pipe.load_lora_weights`, `personalize generate` and `export --format kohya`
take it."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..adapters import ADAPTER_METHODS, COMPONENTS, LORA_WEIGHTS, read_lora
from ..defaults import METHOD_LABELS
from ..embeddings import A1111_DIR, DIFFUSERS_FILE, of_source_runs, save_embeddings
from ..errors import UserError
from ..fileio import atomic_dir, write_json, write_text
from ..outputs import check_output, output_lock
from ..runs import RUN_JSON, read_run, write_run
from ..runtimes import EXPORT_JSON

if TYPE_CHECKING:
    import torch

DEFAULT_RANK = 16  # neither --rank nor --energy: the BK-SDM recipe's LoRA rank


@dataclass
class Delta:
    """One weight's change, dense (out, n) or factored as B (out, r) @ A (r, n)."""

    comp: str
    module: str
    shape: tuple[int, ...]  # the weight's own shape: (out, in) or (out, in, kh, kw)
    dense: "torch.Tensor | None" = None
    factors: "tuple[torch.Tensor, torch.Tensor] | None" = None

    def matrix(self) -> "torch.Tensor":
        return self.dense if self.dense is not None else self.factors[0] @ self.factors[1]


def kept_rank(s: "torch.Tensor", rank: int | None, energy: float | None) -> int:
    """How many of the singular values `s` (descending) to keep."""
    k = int(s.numel())
    if energy is not None and energy < 1:
        e = s.double().square().cumsum(0)
        if float(e[-1]) > 0:
            k = min(k, int((e / e[-1] < energy).sum()) + 1)
    return min(k, rank) if rank is not None else k


def svd(d: Delta) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """U, S, V^T of the change (thin); a factored one through the SVD of its r x r core."""
    import torch

    if d.dense is not None:
        return torch.linalg.svd(d.dense.float(), full_matrices=False)
    b, a = (t.float() for t in d.factors)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def low_rank(d: Delta, rank: int | None, energy: float | None) -> tuple["torch.Tensor", "torch.Tensor", dict]:
    """(up, down) in the weight's layout, and {"rank", "full_rank", "relative_error"}."""
    u, s, vh = svd(d)
    k = max(kept_rank(s, rank, energy), 1)
    up, down = u[:, :k] * s[:k], vh[:k]
    m = d.matrix().float()
    norm = float(m.norm())
    err = float((m - up @ down).norm())
    stats = {"rank": k, "full_rank": int(s.numel()), "relative_error": err / norm if norm else 0.0,
             "norm": norm, "error": err}
    if len(d.shape) == 4:  # conv: a kh x kw conv down to k channels, a 1x1 conv up
        return up.reshape(d.shape[0], k, 1, 1), down.reshape(k, *d.shape[1:]), stats
    return up, down, stats


# --------------------------------------------------------------------------------------------
# The weight changes of a run
# --------------------------------------------------------------------------------------------
def lora_deltas(run_dir: Path) -> Iterator[Delta]:
    """A LoRA run's (alpha/r) B A per module, factored (rsLoRA's scale is folded in by read_lora)."""
    for (comp, module), x in read_lora(Path(run_dir) / LORA_WEIGHTS).items():
        b = x.up.flatten(1).float() * (x.alpha / x.rank)
        yield Delta(comp, module, (int(x.up.shape[0]), *x.down.shape[1:]), factors=(b, x.down.flatten(1).float()))


def merged_deltas(run_dir: Path) -> Iterator[Delta]:
    """W' - W of every adapted layer of an adapter run, merged by peft on the run's own base."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..sources import load_pipeline, resolve_source

    pipe = load_pipeline(resolve_source(run_dir), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for comp in COMPONENTS:
            for name, module in getattr(pipe, comp).named_modules():
                if isinstance(module, BaseTunerLayer):
                    w = module.get_base_layer().weight
                    before = w.detach().clone()
                    module.merge()
                    yield Delta(comp, name, tuple(w.shape), dense=(w.detach() - before).flatten(1))


def full_deltas(run_dir: Path, run: dict, other: dict) -> Iterator[Delta]:
    """W_run - W_base of every changed Linear/Conv2d weight of a full run; every other changed
    parameter is counted into `other` ({"parameters", "sq_change", "sq_base"})."""
    import torch
    from torch import nn

    from ..sources import load_components, run_base

    base = run_base(run)
    new, old = load_components(Path(run_dir)), load_components(base.path)
    for comp in COMPONENTS:
        before = dict(old[comp].named_parameters())
        for pname, p in new[comp].named_parameters():
            p0 = before.get(pname)
            if p0 is None or p0.shape != p.shape:
                raise UserError(f"{run_dir}: {comp}.{pname} is not in its base {base.name} or differs in shape; "
                                f"run.json names the wrong base")
            if torch.equal(p, p0):
                continue
            module, _, leaf = pname.rpartition(".")
            owner = new[comp].get_submodule(module)
            if leaf == "weight" and (isinstance(owner, nn.Linear) or isinstance(owner, nn.Conv2d) and owner.groups == 1):
                yield Delta(comp, module, tuple(p.shape), dense=(p - p0).detach().flatten(1))
            else:
                other["parameters"] += 1
                other["sq_change"] += float((p - p0).detach().double().square().sum())
                other["sq_base"] += float(p0.detach().double().square().sum())


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------
def lora_config(ranks: dict[str, int]) -> dict:
    """The peft LoraConfig (as diffusers stores it in the file's metadata) of modules of these
    ranks, alpha = rank each: r is the commonest rank, the others are anchored patterns (`^name`,
    diffusers' own form)."""
    from peft import LoraConfig

    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{m}": k for m, k in ranks.items() if k != r}
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern=dict(pattern), lora_dropout=0.0, init_lora_weights="gaussian").to_dict()


@dataclass
class LoraExport:
    path: Path
    report: dict  # what export.json holds

    def summary(self) -> str:
        r = self.report
        ranks = [m["rank"] for m in r["modules"].values()]
        worst = max(r["modules"].items(), key=lambda kv: kv[1]["relative_error"])
        line = (f"{len(ranks)} modules at rank {min(ranks)}-{max(ranks)}: relative error {r['relative_error']:.3g} "
                f"(worst {worst[0]} {worst[1]['relative_error']:.3g})")
        if r.get("not_carried"):
            line += f"; {r['not_carried']['parameters']} changed parameters no LoRA carries (biases, norms, embeddings)"
        return line


def export_lora(run_dir: Path, out: Path, rank: int | None = None, energy: float | None = None,
                overwrite: bool = False) -> LoraExport:
    """RUN_DIR (any adapter method or a full run) as a LoRA run folder at `out` (see the module doc)."""
    import torch

    run_dir, out = Path(run_dir), Path(out)
    run = read_run(run_dir, finished=True)
    method = run.get("method", "lora")
    if rank is not None and rank <= 0 or energy is not None and not 0 < energy <= 1:
        raise UserError(f"--format lora: --rank must be positive and --energy in (0, 1], got {rank} and {energy}")
    if rank is None and energy is None:
        rank = DEFAULT_RANK
    check_output(out, kind="dir", inputs=[run_dir], overwrite=overwrite)
    other = {"parameters": 0, "sq_change": 0.0, "sq_base": 0.0}
    if method == "lora":
        deltas = lora_deltas(run_dir)
    elif method in ADAPTER_METHODS:
        deltas = merged_deltas(run_dir)
    else:
        deltas = full_deltas(run_dir, run, other)
    layers: dict[str, dict] = {c: {} for c in COMPONENTS}
    ranks: dict[str, dict[str, int]] = {c: {} for c in COMPONENTS}
    modules, sq_err, sq_norm = {}, 0.0, 0.0
    with torch.no_grad():
        for d in deltas:
            if not d.matrix().abs().max() > 0:
                continue  # a layer that did not change adds nothing
            up, down, stats = low_rank(d, rank, energy)
            layers[d.comp][f"{d.module}.lora_A.weight"] = down.contiguous()
            layers[d.comp][f"{d.module}.lora_B.weight"] = up.contiguous()
            ranks[d.comp][d.module] = stats["rank"]
            sq_err, sq_norm = sq_err + stats.pop("error") ** 2, sq_norm + stats.pop("norm") ** 2
            modules[f"{d.comp}.{d.module}"] = stats
    if not modules:
        raise UserError(f"{run_dir}: no weight differs from its base; there is no change to export as a LoRA")
    report = {"format": "lora", "from": str(run_dir.resolve()), "method": method, "base": run.get("base"),
              "rank": rank, "energy": energy, "relative_error": math.sqrt(sq_err / sq_norm) if sq_norm else 0.0,
              "modules": modules}
    if other["parameters"]:
        report["not_carried"] = {"parameters": other["parameters"],
                                 "relative_change": math.sqrt(other["sq_change"] / max(other["sq_base"], 1e-30))}
    with output_lock(out):
        _write(out, run, layers, ranks, report, overwrite)
    return LoraExport(out, report)


def _write(out: Path, run: dict, layers: dict, ranks: dict, report: dict, overwrite: bool) -> None:
    from diffusers import StableDiffusionPipeline

    kw = {f"{c}_lora_adapter_metadata": lora_config(ranks[c]) for c in COMPONENTS if layers[c]}
    unet_rank = kw.get("unet_lora_adapter_metadata", {}).get("r")
    label = METHOD_LABELS.get(report["method"], report["method"])
    record = {k: v for k, v in run.items() if k not in ("step", "of_run", "outputs")}
    pivotal = of_source_runs([(Path(report["from"]), run)])  # --pivotal: its embeddings go along
    record |= {"method": "lora", "outputs": [LORA_WEIGHTS, *([DIFFUSERS_FILE, A1111_DIR] if pivotal else [])],
               "config": dict(run.get("config") or {}) | {"method": "lora", "rank": unet_rank, "lora_alpha": unet_rank,
                                                          "rslora": False, "rank_pattern": {}, "alpha_pattern": {}},
               "converted": {k: report[k] for k in ("from", "method", "rank", "energy", "relative_error")}}
    with atomic_dir(out, replace=overwrite) as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers["unet"] or None,
                                                  text_encoder_lora_layers=layers["text_encoder"] or None,
                                                  safe_serialization=True, **kw)
        write_json(tmp / EXPORT_JSON, report)
        if pivotal:
            save_embeddings(tmp, *pivotal)
        write_run(tmp, record)
        write_text(tmp / "README.md",
                   f"# {run['subject']['name']}: the {label} run `{report['from']}` as a LoRA\n\n"
                   f"A truncated SVD of each weight's change ({'rank ' + str(report['rank']) if report['rank'] else ''}"
                   f"{', ' if report['rank'] and report['energy'] else ''}"
                   f"{'energy ' + str(report['energy']) if report['energy'] else ''}); relative error "
                   f"{report['relative_error']:.4g} over all modules, per module in `{EXPORT_JSON}`. It is a LoRA "
                   f"run ({RUN_JSON}): `pipe.load_lora_weights(\"{out}\")`, `personalize generate {out}`, "
                   f"`personalize export {out} --format kohya`.\n")
