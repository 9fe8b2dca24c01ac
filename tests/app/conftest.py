"""One app process with the tiny model for the whole app test folder, plus a local rewriter endpoint."""

from __future__ import annotations

import pytest
from app_server_support import ChatEndpoint, running_app, wait_until_ready


@pytest.fixture(scope="session")
def rewriter_url():
    """An OpenAI-compatible chat endpoint that answers "A vivid, detailed <prompt>."."""
    with ChatEndpoint(lambda body: f"A vivid, detailed {body['messages'][-1]['content']}.") as endpoint:
        yield endpoint.url


@pytest.fixture(scope="session")
def app_server(tmp_path_factory, rewriter_url):
    """(url, output_dir) of `python app.py --model tiny` with the model loaded."""
    from gradio_client import Client

    tmp = tmp_path_factory.mktemp("app")
    with running_app(tmp, "--rewriter-url", rewriter_url, "--rewriter-key-env", "") as (url, output_dir):
        wait_until_ready(Client(url, verbose=False))
        yield url, output_dir


@pytest.fixture()
def client(app_server):
    from gradio_client import Client

    return Client(app_server[0], verbose=False)
