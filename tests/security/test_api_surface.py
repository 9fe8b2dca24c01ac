"""The whole API surface of a shared server, enumerated: every endpoint's parameters are on a reviewed allowlist (so
a new endpoint taking a path, URL or environment-variable name cannot slip in), every parameter refuses a wrong type
with a message naming it, and every text input, public or private, is fed server paths, a client-chosen URL and the
name of a secret environment variable without a secret leaving, a file appearing outside the caller's workspace, or
the app going down."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import CANARY_ENV, ENDPOINT_KEY_ENV

# Every dependency of the shared page, by api_name (private events: Gradio names them after their function), with
# the labels of its inputs (States excluded; text in parentheses dropped). A change here is a security review.
RECAPTION = ["Dataset", "Backend", "Template", "Target words", "Concurrent requests", "Batch size", "Precision",
             "Max new tokens", "Outputs", "Overwrite existing captions", "Custom prompt",
             "Sidecar extension"]  # fmt: skip
GENERATE_FORM = ["Prompt", "Negative prompt", "Rewritten prompt", "Generate with the rewritten prompt", "Variant",
                 "Width", "Height", "Steps", "Guidance", "Seed", "Seed value", "Batch count", "Batch size", "LoRA 1",
                 "Weight", "LoRA 2", "Weight", "LoRA 3", "Weight"]  # fmt: skip
ALLOWED = {
    # page
    "lambda": [],  # the model-status timer
    "queue_status": [],  # the "N jobs ahead of you" timer
    "load_demo_model": [],
    "model_status": [],
    "adopt": ["<browserstate>"],  # the browser's signed workspace id (HMAC-checked)
    # Generate
    "load_example": ["Example prompts"],
    "variant_defaults": ["Variant"],
    "aspect_size": ["Aspect"],
    "width_to_aspect": ["Width", "Height"],
    "height_to_aspect": ["Width", "Height"],
    "reuse_seed": ["Seed used"],
    "list_loras": [],
    "set_memory_mode": ["Memory mode"],
    "restore": ["Drop a PNG here to restore its settings"],
    "restore_settings": ["PNG with settings"],
    "_start_job": [],
    "generate_stream": GENERATE_FORM,
    "cancel": [],
    "rewrite_prompt": ["Prompt", "Backend"],
    "generate": [
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "variant",
        "batch_count",
        "batch_size",
        "loras",
    ],  # fmt: skip
    # Gallery
    "list_gallery": [],
    "load": [],
    "select": [],
    "send_to_generate": [],
    "delete_selected": [],
    "delete_image": ["file_name"],  # a plain file name in the caller's own images/
    # Recaption
    "false": ["Template"],
    "refresh_choices": ["Dataset"],
    "refresh_choices_1": ["Dataset to review"],
    "recaption_upload_zip": ["...or upload a zip or images"],
    "recaption_delete_dataset": ["Dataset"],  # a dataset *name* from the caller's own uploads
    "recaption_preview": RECAPTION,
    "recaption_start": RECAPTION,
    "recaption_resume": RECAPTION,
    "recaption_stop": [],
    "recaption_use_demo_model": [],
    "recaption_poll": [],
    "recaption_load_review": ["Dataset to review", "Only flagged captions"],
    "recaption_show_caption": ["Image"],
    "false_1": [],
    "recaption_save_caption": ["Image", "Caption", "Only flagged captions"],
    "recaption_accept_unflagged": ["Only flagged captions"],
    # Train
    "train_start": [
        "Dataset",
        "Base model",
        "Preset",
        "Run name",
        "Steps",
        "Learning rate",
        "LoRA rank",
        "Trigger word",
        "Sample prompts",
        "More settings",
    ],  # fmt: skip
    "train_stop": [],
    "train_resume": ["Run name"],
    "train_load_lora": ["Trained LoRA"],  # a LoRA *name* from the caller's own list, as /generate takes
    "train_status": [],
    "preset_rank": ["Preset"],  # a preset name (a choice) -> its LoRA rank
    "refresh": [],
    "dataset_choices": ["Dataset"],
}
SUSPICIOUS = re.compile(r"url|path|folder|dir|env|key|file|host|endpoint", re.I)
REVIEWED_SUSPICIOUS = {("delete_image", "file_name"), ("restore_settings", "PNG with settings")}
WRONG = {"number": "abc", "integer": "abc", "string": {"not": "text"}, "boolean": "yes", "array": 7, "object": "x"}


def short(label: str | None) -> str:
    return re.sub(r"\s*\(.*$", "", label or "").strip()


def surface(raw) -> dict[str, list[str]]:
    components = {c["id"]: c for c in raw.config["components"]}
    found = {}
    for dependency in raw.config["dependencies"]:
        labels = []
        for component_id in dependency["inputs"]:
            component = components[component_id]
            if component["type"] == "state":
                continue
            labels.append(short(component["props"].get("label")) or f"<{component['type']}>")
        found[dependency["api_name"]] = labels
    return found


@pytest.mark.parametrize("which", ["login_app", "space_app"])
def test_every_endpoint_and_parameter_is_on_the_reviewed_allowlist(which, request):
    app = request.getfixturevalue(which)
    raw = app.raw("alice" if which == "login_app" else None)
    assert surface(raw) == ALLOWED
    # The documented API (view_api) is a subset, with the same parameters.
    client = app.client("alice" if which == "login_app" else None)
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name, endpoint in named.items():
        labels = [short(parameter["label"]) for parameter in endpoint["parameters"]]
        assert labels == ALLOWED[name.lstrip("/")], name
        for label in labels:
            if SUSPICIOUS.search(label):
                assert (name.lstrip("/"), label) in REVIEWED_SUSPICIOUS, f"{name} takes {label!r}"


def _default_data(raw, dependency) -> list:
    components = {c["id"]: c for c in raw.config["components"]}
    return [
        components[i]["props"].get("value") if components[i]["type"] != "state" else None for i in dependency["inputs"]
    ]


SMALL_JOB = {"generate": {2: 64, 3: 64, 4: 2}, "generate_stream": {5: 64, 6: 64, 7: 2}}


def test_wrong_types_get_a_message_naming_the_parameter_on_every_endpoint(login_app):
    raw = login_app.raw("bob")
    components = {c["id"]: c for c in raw.config["components"]}
    checked = 0
    for dependency in raw.config["dependencies"]:
        data = _default_data(raw, dependency)
        for index, component_id in enumerate(dependency["inputs"]):
            component = components[component_id]
            kind = component.get("api_info", {}).get("type") if isinstance(component.get("api_info"), dict) else None
            kind = {"file": "object", "json": None, "state": None, "browserstate": None, "dataset": None}.get(
                component["type"], kind or {"textbox": "string", "number": "number", "slider": "number",
                "checkbox": "boolean", "checkboxgroup": "array", "radio": "string", "dropdown": "string"}.get(component["type"])
            )  # fmt: skip
            if kind is None:
                continue
            wrong = list(data)
            wrong[index] = WRONG[kind]
            outcome = raw.call(dependency["id"], wrong)
            label = short(component["props"].get("label"))
            assert not outcome.success, (dependency["api_name"], label)
            assert outcome.error and label.split()[0].lower() in outcome.error.lower(), (
                dependency["api_name"],
                label,
                outcome,
            )
            checked += 1
    assert checked > 60
    assert "ready" in login_app.client("bob").predict(api_name="/model_status")


def _tree(root: Path, skip: list[Path]) -> dict[str, float]:
    """Every file under `root` (outside `skip`) with its modification time."""
    return {
        str(path): path.stat().st_mtime
        for path in root.rglob("*")
        if path.is_file() and not any(path.is_relative_to(folder) for folder in skip)
    }


def test_hostile_text_in_every_input_sends_no_secret_and_writes_nothing_outside_the_workspace(login_app, tmp_path):
    raw = login_app.raw("bob")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.png").write_bytes((Path(__file__).parent / "__init__.py").read_bytes())
    hostile = [
        str(outside),
        str(outside / "victim.png"),
        "../../../../../../" + str(outside).lstrip("/"),
        login_app.listener.url,
        CANARY_ENV,
        ENDPOINT_KEY_ENV,
    ]
    root = login_app.output_dir.parent
    skip = [login_app.output_dir / "users", login_app.temp_dir, root / "cache", root / "app.log"]
    before, outside_before = _tree(root, skip), _tree(outside, [])
    components = {c["id"]: c for c in raw.config["components"]}
    for dependency in raw.config["dependencies"]:
        text_inputs = [
            index
            for index, component_id in enumerate(dependency["inputs"])
            if components[component_id]["type"] in ("textbox", "dropdown", "radio", "json")
        ]
        for index in text_inputs:
            for value in hostile:
                data = _default_data(raw, dependency)
                for position, number in SMALL_JOB.get(dependency["api_name"], {}).items():
                    data[position] = number
                data[index] = (
                    [{"name": value, "weight": 1}]
                    if components[dependency["inputs"][index]]["type"] == "json"
                    else value
                )
                outcome = raw.call(dependency["id"], data)
                assert outcome.success or outcome.error, (dependency["api_name"], value)  # never a bare "Error"
    assert login_app.secrets_seen_by_listener() == []
    assert login_app.listener.requests == []  # nothing at all went to the client's URL
    assert _tree(root, skip) == before  # the server's own files: untouched
    assert _tree(outside, []) == outside_before  # no sidecar, no cache written next to the victim
    assert "ready" in login_app.client("bob").predict(api_name="/model_status")


def test_queued_events_cannot_skip_the_queue_over_rest(login_app):
    """Gradio opens `/run/<api_name>` for every event unless told otherwise: a shared server closes it for queued
    events, so nobody bypasses the queue size, its order or the GPU's concurrency group."""
    raw = login_app.raw("bob")
    body = {"data": ["a fox", "", 64, 64, 2, -1, -1, "Lens-Turbo", 1, 1, [], None]}
    response = raw.http.post("gradio_api/run/generate", json=body)
    assert response.status_code == 404 and "join the queue" in response.text
