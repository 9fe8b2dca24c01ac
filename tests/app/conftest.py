"""One app process with the tiny model for the whole app test folder, plus a local rewriter endpoint."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from app_server_support import running_app, wait_until_ready


class EchoRewriter(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that answers "A vivid, detailed <prompt>."."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = {"choices": [{"message": {"content": f"A vivid, detailed {body['messages'][-1]['content']}."}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def rewriter_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoRewriter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


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
