"""A module's forward replaced for a block: the given one inside, whatever it had after (its class's
or an instance forward of its own), also when the block raises."""

from __future__ import annotations

import pytest
from torch import nn

from personalize.forwards import replaced_forwards


def test_inside_the_given_forward_after_what_each_had():
    plain, wrapped = nn.Identity(), nn.Identity()
    own = lambda x: x + 1  # noqa: E731 - an instance forward already there (half storage's, say)
    wrapped.forward = own
    with replaced_forwards([(plain, lambda x: x * 2), (wrapped, lambda x: x * 3)]) as n:
        assert n == 2 and plain(5) == 10 and wrapped(5) == 15
    assert "forward" not in plain.__dict__ and plain(5) == 5
    assert wrapped.forward is own and wrapped(5) == 6


def test_put_back_when_the_block_raises():
    m = nn.Identity()
    with pytest.raises(RuntimeError), replaced_forwards([(m, lambda x: -x)]):
        raise RuntimeError("boom")
    assert "forward" not in m.__dict__ and m(3) == 3
