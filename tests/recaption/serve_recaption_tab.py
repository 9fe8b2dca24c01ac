"""Serve only the Recaption tab: ``python tests/recaption/serve_recaption_tab.py PORT OUTPUT_ROOT`` (browser tests)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import gradio as gr  # noqa: E402

from app.recaption_tab import build_recaption_tab  # noqa: E402


def main() -> None:
    port, output_root = int(sys.argv[1]), Path(sys.argv[2])
    with gr.Blocks(title="Recaption test") as demo, gr.Tab("Recaption"):
        build_recaption_tab(output_root)
    demo.launch(server_name="127.0.0.1", server_port=port, show_error=True)


if __name__ == "__main__":
    main()
