"""The model card's code runs as written (for the built-in `tiny` base: a local folder, no hub id)."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("method", ["lora", "full", "pivotal"])
def test_card_usage_code_runs_as_written(method, request):
    run = request.getfixturevalue(f"{method}_run")
    card = (run / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "from_pretrained('tiny')" not in code and 'from_pretrained("tiny")' not in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own card, that is the test
    assert scope["image"].size == (64, 64)
    if method in ("lora", "pivotal"):
        assert scope["pipe"].unet.peft_config and scope["pipe"].text_encoder.peft_config
    if method == "pivotal":  # the new tokens loaded by the card's load_textual_inversion line
        assert scope["pipe"].tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"]) == [514, 515]
