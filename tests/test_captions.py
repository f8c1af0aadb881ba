"""--caption-dropout, --shuffle-caption, --keep-tokens (personalize.captions) and the text cache
that computes what varies and keeps what does not (personalize.text_cache)."""

from __future__ import annotations

import torch

from personalize.captions import host_generator, shuffled, split_parts, vary

CAPTION = "a sks dog, on grass, red collar, sunny day, blue sky"


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shuffling_keeps_the_first_parts_and_the_subject_in_place():
    seen = set()
    for seed in range(40):
        out = shuffled("on grass, a sks dog, red collar, sunny day, blue sky", 1, "sks", _g(seed))
        parts = split_parts(out)
        assert parts[0] == "on grass" and parts[1] == "a sks dog"  # kept: the first, and the subject's part
        assert sorted(parts[2:]) == ["blue sky", "red collar", "sunny day"]
        seen.add(out)
    assert len(seen) == 6  # every order of the three free parts turns up


def test_no_free_parts_no_change_but_the_separator_spacing():
    assert shuffled("a sks dog", 0, "sks", _g()) == "a sks dog"
    assert shuffled("a sks dog,on grass", 1, "sks", _g()) == "a sks dog, on grass"


def test_dropout_replaces_the_caption_with_the_empty_prompt_at_its_rate():
    out = [vary(CAPTION, _g(s), dropout=0.3, shuffle=False, keep_tokens=0, token="sks") for s in range(400)]
    assert {o for o in out} == {"", CAPTION}
    assert 0.22 < out.count("") / len(out) < 0.38
    assert vary(CAPTION, _g(), dropout=0.0, shuffle=False, keep_tokens=0, token="sks") == CAPTION


def test_variants_are_a_function_of_the_steps_generator():
    def draws(step_seed, micro):
        g = torch.Generator().manual_seed(step_seed)
        h = host_generator(g, micro)
        return [vary(CAPTION, h, dropout=0.2, shuffle=True, keep_tokens=1, token="sks") for _ in range(5)]

    assert draws(11, 0) == draws(11, 0)  # a resumed step draws what it drew before
    assert draws(11, 0) != draws(12, 0) and draws(11, 0) != draws(11, 1)


def test_the_text_cache_embeds_each_variant_once_and_as_when_recomputed(tiny_base):
    from transformers import CLIPTextModel, CLIPTokenizer

    from personalize.text_cache import TextCache

    tok = CLIPTokenizer.from_pretrained(tiny_base / "tokenizer")
    te = CLIPTextModel.from_pretrained(tiny_base / "text_encoder").eval()
    calls = []
    real = te.forward
    te.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    text = TextCache(tok, te, ["a sks dog", CAPTION], "a dog", "cpu", frozen=True, extra=("",))
    assert len(calls) == 3  # the captions (one batch), the class prompt, the empty prompt
    variant = "a sks dog, red collar, on grass, sunny day, blue sky"
    first = text.embeddings([variant, "a sks dog", ""])
    assert len(calls) == 4  # only the new variant
    again = text.embeddings([variant])
    assert len(calls) == 4 and torch.equal(again[0], first[0])
    fresh = TextCache(tok, te, ["a sks dog", CAPTION], "a dog", "cpu", frozen=True)
    assert torch.equal(fresh.embeddings([variant])[0], first[0])  # a resumed run's empty cache: the same values
    assert torch.equal(first[1], text.emb[0])
    assert text.token_ids([variant, "a dog"]).shape == (2, 77)
