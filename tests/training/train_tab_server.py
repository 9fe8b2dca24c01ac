"""A small Blocks with only the Train tab, for the gradio_client test: python train_tab_server.py ROOT PORT."""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr

from app.train_tab import build_train_tab

if __name__ == "__main__":
    root, port = Path(sys.argv[1]), int(sys.argv[2])
    with gr.Blocks() as demo, gr.Tab("Train"):
        build_train_tab(root, engine=None)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=False)
