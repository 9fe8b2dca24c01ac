"""The prompt rewriter: settings validation, final-channel extraction, an OpenAI-compatible endpoint served by a real
local HTTP server, and the local GPT-OSS backend on the tiny checkpoint."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lens_core.rewriter import (
    REWRITE_INSTRUCTION,
    LocalGptOssRewriter,
    OpenAICompatibleRewriter,
    RewriterError,
    RewriterSettings,
    extract_final_message,
)

KEY_ENV = "LENS_TEST_REWRITER_KEY"
SECRET = "sk-test-secret-123"


class ChatHandler(BaseHTTPRequestHandler):
    """A minimal `/v1/chat/completions`: records requests, answers per `behaviour`."""

    requests: list = []
    behaviour = "ok"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if type(self).behaviour == "error":
            self._send(401, {"error": {"message": "bad key"}})
        elif type(self).behaviour == "no-choices":
            self._send(200, {"object": "chat.completion"})
        else:
            prompt = body["messages"][-1]["content"]
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": f'"A detailed {prompt}."\n'}}]})

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture()
def endpoint(chat_server, monkeypatch):
    ChatHandler.requests.clear()
    ChatHandler.behaviour = "ok"
    monkeypatch.setenv(KEY_ENV, SECRET)
    return RewriterSettings(base_url=chat_server, model="test-model", api_key_env=KEY_ENV, timeout_s=10)


def test_openai_backend_sends_instruction_prompt_and_key(endpoint):
    assert OpenAICompatibleRewriter(endpoint).rewrite("  a cat  ") == "A detailed a cat."
    (request,) = ChatHandler.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {SECRET}"
    assert request["body"]["model"] == "test-model"
    assert request["body"]["messages"] == [
        {"role": "system", "content": REWRITE_INSTRUCTION},
        {"role": "user", "content": "a cat"},
    ]


def test_openai_backend_errors_are_clear_and_never_show_the_key(endpoint, monkeypatch):
    ChatHandler.behaviour = "error"
    with pytest.raises(RewriterError, match="HTTP 401") as caught:
        OpenAICompatibleRewriter(endpoint).rewrite("a cat")
    assert SECRET not in str(caught.value)
    ChatHandler.behaviour = "no-choices"
    with pytest.raises(RewriterError, match="without choices"):
        OpenAICompatibleRewriter(endpoint).rewrite("a cat")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RewriterError, match=f"{KEY_ENV} .* is not set"):
        OpenAICompatibleRewriter(endpoint).rewrite("a cat")


def test_unreachable_endpoint(endpoint):
    settings = RewriterSettings(base_url="http://127.0.0.1:9/v1", api_key_env="", timeout_s=5)
    with pytest.raises(RewriterError, match="Cannot reach"):
        OpenAICompatibleRewriter(settings).rewrite("a cat")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backend": "magic"}, "Unknown rewriter backend"),
        ({"base_url": "ftp://x"}, "http"),
        ({"api_key_env": "MY KEY"}, "environment variable name"),
        ({"timeout_s": 0}, "positive"),
    ],
)
def test_settings_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        RewriterSettings(**changes)


@pytest.mark.parametrize("prompt", ["", "   ", "x" * 5000])
def test_bad_prompts_are_rejected(endpoint, prompt):
    with pytest.raises(ValueError):
        OpenAICompatibleRewriter(endpoint).rewrite(prompt)


def test_final_channel_extraction_drops_reasoning():
    text = (
        "<|start|>assistant<|channel|>analysis<|message|>The user wants a cat.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>A ginger cat asleep on a red rug.<|return|>"
    )
    assert extract_final_message(text) == "A ginger cat asleep on a red rug."
    assert extract_final_message("<|channel|>final<|message|>Cut off mid") == "Cut off mid"
    with pytest.raises(RewriterError, match="no final-channel"):
        extract_final_message("<|channel|>analysis<|message|>thinking only<|end|>")


def test_local_backend_loads_gpt_oss_from_the_checkpoint(tiny_checkpoint):
    # The tiny random GPT-OSS never writes a final-channel message, so the rewriter must say so instead of
    # returning its reasoning; the point here is that the model loads and generates from `text_encoder/`.
    rewriter = LocalGptOssRewriter(tiny_checkpoint, RewriterSettings(backend="local", max_new_tokens=8))
    with pytest.raises(RewriterError, match="no final-channel"):
        rewriter.rewrite("a cat")
    assert type(rewriter._model).__name__ == "GptOssForCausalLM"
    assert rewriter._model.config.num_hidden_layers == 6


def test_local_backend_needs_a_text_encoder_folder(tmp_path):
    with pytest.raises(RewriterError, match="no text_encoder"):
        LocalGptOssRewriter(tmp_path, RewriterSettings(backend="local")).rewrite("a cat")
