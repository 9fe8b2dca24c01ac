"""Lens studio: `python app.py [--model tiny] [--port 7860] [--auth user:password] ...` (see `--help`).

Parse the command line, build the engine (it loads the model in the background so the page opens at once and can
explain a missing model), build the UI, launch.
"""

import logging

from app.access import Hosting
from app.settings import parse_args
from app.ui import build_ui, launch_options, queue_options
from lens_core.engine import EngineConfig, LensEngine


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = parse_args()
    config = EngineConfig(
        output_dir=settings.output_dir,
        model=settings.model,
        memory_mode=settings.memory_mode,
        local_files_only=settings.local_files_only,
    )
    engine = LensEngine(config)  # owns the pipeline, the GPU lock and the text-feature cache
    engine.load_in_background()
    hosting = Hosting.from_settings(settings)  # personal or shared: whose workspace, who may change the model
    logging.getLogger("app").info("%s", hosting.mode.banner())
    hosting.start_expiring_anonymous_workspaces()  # shared mode: idle anonymous workspaces do not pile up
    demo = build_ui(engine, settings, hosting)
    demo.queue(**queue_options(settings, hosting)).launch(**launch_options(settings, hosting))


if __name__ == "__main__":
    main()
