"""Why, the small things, through the running server: the negative prompt has the prompt's limit, batch seeds that
would run past the largest seed are refused before anything runs, and a wrong type is named."""

from __future__ import annotations

import pytest
from gradio_client.exceptions import AppError

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"negative_prompt": "x" * 1_260_000}, "negative prompt has 1260000 characters; the limit is 4000"),
        ({"seed": 2**32 - 1, "batch_size": 2}, "the seed can be at most 4294967294"),
        ({"seed": 2**32 - 4, "batch_count": 3, "batch_size": 2}, "the seed can be at most 4294967290"),
        ({"guidance_scale": "abc"}, "guidance_scale must be a number, got 'abc'"),
        ({"width": True}, "width must be a whole number"),
        ({"prompt": ["a", "list"]}, "prompt must be text"),
        ({"variant": "Lens-Base"}, None),  # a preset change on a local checkpoint: allowed for everyone
    ],
)
def test_generate_refuses_before_running(bob, changes, message):
    arguments = {"prompt": "a fox", **SMALL, **changes}
    if message is None:
        files, _ = bob.predict(api_name="/generate", **arguments)
        assert files
        return
    with pytest.raises(AppError, match=message):
        bob.predict(api_name="/generate", **arguments)
