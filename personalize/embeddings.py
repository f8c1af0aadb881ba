"""New token embeddings (pivotal tuning's, personalize/pivotal.py) as files, and put into a
tokenizer and text encoder: the one reader and writer of them, used by training, `generate`,
`eval`, the app and every export.

A pivotal run keeps its tokens and files in run.json (`"pivotal": {"tokens": [...], "files": ...}`)
and writes two files of the same (n, D) vectors, one row per new token:

- `embeddings.safetensors`, `{"clip_l": (n, D)}`: the layout of diffusers' advanced DreamBooth
  script (`TokenEmbeddingsHandler.save_embeddings`), read with
  `pipe.load_textual_inversion(load_file(f)["clip_l"], token=["<s0>", "<s1>"])` (or, as one
  multi-vector token, `pipe.load_textual_inversion(f, token="<s0>")`); ComfyUI reads its
  `clip_l` key too (comfy/sd1_clip.py `load_embed`, `embed_key`).
- `embeddings/<identifier>.safetensors`, `{"emb_params": (n, D)}`: kohya's textual-inversion
  layout, a single tensor, which AUTOMATIC1111 reads as an n-vector embedding named after the file
  (modules/textual_inversion/textual_inversion.py, `create_embedding_from_data`, its "diffuser
  concepts" branch) and ComfyUI as `embedding:<identifier>`. Named after the identifier token, so
  the prompts people already write ("a sks dog") pick it up in A1111.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .fileio import atomic_file

if TYPE_CHECKING:  # torch is imported where a tensor is made: config.py reads the token names
    import torch

DIFFUSERS_FILE = "embeddings.safetensors"
DIFFUSERS_KEY = "clip_l"  # the advanced script's key for SD's (CLIP ViT-L) text encoder
A1111_DIR = "embeddings"
A1111_KEY = "emb_params"  # kohya's train_textual_inversion.py key for SD v1/v2
KOHYA_BUNDLE = "bundle_emb"  # kohya / A1111: bundle_emb.<name>.string_to_param.* inside a LoRA file


def new_tokens(n: int) -> list[str]:
    """`<s0>`, `<s1>`, ...: the advanced script's names for the tokens replacing the identifier."""
    return [f"<s{i}>" for i in range(n)]


def prompt_token(tokens: list[str]) -> str:
    """What stands for the subject in a prompt: the new tokens written together, as the advanced
    script replaces its --token_abstraction ("a <s0><s1> dog"); CLIP's tokenizer splits added tokens."""
    return "".join(tokens)


def save_embeddings(dest: Path, name: str, vectors: torch.Tensor) -> list[str]:
    """Both files of `vectors` (n, D) into `dest`, each written atomically; returns their names."""
    from safetensors.torch import save_file

    with atomic_file(Path(dest) / DIFFUSERS_FILE) as tmp:
        save_file({DIFFUSERS_KEY: vectors.detach().float().cpu().contiguous()}, str(tmp))
    a1111_embedding(Path(dest) / A1111_DIR / f"{name}.safetensors", vectors)
    return [DIFFUSERS_FILE, A1111_DIR]


def a1111_embedding(path: Path, vectors: torch.Tensor) -> Path:
    """One `{"emb_params": (n, D)}` file at `path` (its stem is the embedding's name), atomically."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({A1111_KEY: vectors.detach().float().cpu().contiguous()}, str(tmp))
    return Path(path)


def of_source_runs(runs: list[tuple[Path, dict]]) -> tuple[str, torch.Tensor] | None:
    """(identifier, vectors) of the first pivotal run among (run_dir, run.json) pairs, or None."""
    for run_dir, run in runs:
        found = read_embeddings(run_dir, run)
        if found is not None:
            return str(run["pivotal"].get("identifier") or "emb"), found[1]
    return None


def record(tokens: list[str], identifier: str, name: str) -> dict:
    """run.json's "pivotal" entry."""
    return {"tokens": tokens, "identifier": identifier,
            "files": {"diffusers": DIFFUSERS_FILE, "a1111": f"{A1111_DIR}/{name}.safetensors"}}


def read_embeddings(run_dir: Path, run: dict) -> tuple[list[str], torch.Tensor] | None:
    """(tokens, (n, D) vectors) of a pivotal run, or None for any other run. A missing or damaged
    file is one line naming it."""
    from safetensors.torch import load_file

    rec = run.get("pivotal")
    if not rec:
        return None
    path = Path(run_dir) / DIFFUSERS_FILE
    tokens = rec.get("tokens") if isinstance(rec, dict) else None
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise UserError(f"{Path(run_dir) / 'run.json'}: field pivotal.tokens is not a list of token names")
    try:
        vec = load_file(str(path))[DIFFUSERS_KEY]
    except Exception as e:  # noqa: BLE001 - a missing, truncated or foreign file all mean "cannot use"
        raise UserError(f"{path}: the run's new-token embeddings do not read ({type(e).__name__}); "
                        f"train it again") from None
    if vec.ndim != 2 or vec.shape[0] != len(tokens):
        raise UserError(f"{path}: holds {tuple(vec.shape)} vectors for the {len(tokens)} tokens of run.json")
    return tokens, vec


def add_tokens(tokenizer, text_encoder, tokens: list[str], vectors: torch.Tensor) -> list[int]:
    """Add `tokens` to the tokenizer and their rows to the text encoder's embedding table, as
    diffusers' `load_textual_inversion` does (add_tokens, resize_token_embeddings, set the rows).
    Returns their ids. A token the tokenizer already has (two pivotal runs mixed) is one line."""
    import torch

    emb = text_encoder.get_input_embeddings()
    if vectors.shape[-1] != emb.weight.shape[1]:
        raise UserError(f"new-token embeddings of width {vectors.shape[-1]} do not fit this text encoder's "
                        f"{emb.weight.shape[1]} (trained on another base?)")
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise UserError(f"token {taken[0]} is already in the tokenizer (two pivotal runs mixed?); "
                        f"generate with one pivotal run at a time")
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    # mean_resizing off: the new rows are set right below (transformers' default draws them at random)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids] = vectors.to(emb.weight.device, emb.weight.dtype)
    return ids


def load_run_embeddings(comps: dict, runs: list[tuple[Path, dict]]) -> str | None:
    """Put the new tokens of every pivotal run among `runs` ((run_dir, run.json) pairs) into
    `comps`' tokenizer and text encoder; returns the first one's prompt token, or None."""
    first = None
    for run_dir, run in runs:
        found = read_embeddings(run_dir, run)
        if found is not None:
            add_tokens(comps["tokenizer"], comps["text_encoder"], *found)
            first = first or prompt_token(found[0])
    return first


def kohya_bundle_of(run_dir: Path, run: dict) -> dict[str, torch.Tensor]:
    """A pivotal run's embedding as kohya LoRA-file keys, named after its identifier; {} otherwise."""
    found = read_embeddings(run_dir, run)
    return {} if found is None else kohya_bundle(str(run["pivotal"].get("identifier") or "emb"), found[1])


def kohya_bundle(name: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The embedding as keys of a kohya LoRA file, which A1111's Lora extension
    (extensions-builtin/Lora/networks.py, `load_network`) registers as the embedding `name`."""
    return {f"{KOHYA_BUNDLE}.{name}.string_to_param.*": vectors.detach().float().cpu().contiguous()}
