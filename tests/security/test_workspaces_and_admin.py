"""Why #3 and #4: each visitor sees only their own gallery (logins and anonymous browsers alike), an anonymous
browser keeps its workspace across reloads but cannot claim another's, and only admins change the model."""

from __future__ import annotations

import stat
from pathlib import Path

from app.workspace import user_folder_name

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def gallery_names(client) -> list[str]:
    items, _count = client.predict(api_name="/list_gallery")
    return [Path(item["image"]).name for item in items]


def test_galleries_are_private_to_each_login(login_app, alice, bob):
    files, _ = alice.predict(prompt="alice private prompt", seed=1, api_name="/generate", **SMALL)
    (alice_file,) = [Path(file).name for file in files]
    saved = login_app.workspaces() / user_folder_name("alice") / "images" / alice_file
    assert saved.is_file()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o644  # readable like any file the server writes (umask 022)
    # The page gets a copy under a random name in Gradio's cache, never a path into the workspace.
    served = login_app.raw("alice").call(
        "generate", ["served copy", "", 64, 64, 2, -1, 2, "Lens-Turbo", 1, 1, [], None]
    )
    (payload,) = served.data[0]
    assert Path(payload["path"]).is_relative_to(login_app.temp_dir) and payload["path"].endswith("-served-copy.png")
    assert alice_file in gallery_names(alice)
    assert alice_file not in gallery_names(bob)
    # Bob can neither delete it by name nor fetch it by its server path.
    raw_bob = login_app.raw("bob")
    outcome = raw_bob.call("delete_image", [alice_file])
    assert not outcome.success and "not an image of your gallery" in outcome.error
    outcome = raw_bob.call("delete_image", [f"../{user_folder_name('alice')}/images/{alice_file}"])
    assert not outcome.success and "plain name" in outcome.error
    assert raw_bob.http.get(f"gradio_api/file={saved}").status_code in (403, 404)
    assert saved.is_file()
    # Alice deletes her own image.
    assert alice.predict(alice_file, api_name="/delete_image") == f"Deleted {alice_file}."
    assert not saved.exists() and alice_file not in gallery_names(alice)


def test_anonymous_visitors_have_separate_workspaces_kept_by_a_signed_id(space_app):
    first, second = space_app.client(), space_app.client()
    files, _ = first.predict(prompt="first visitor", seed=3, api_name="/generate", **SMALL)
    name = Path(files[0]).name
    assert name in gallery_names(first) and name not in gallery_names(second)

    # A browser's page load hands the server the id it kept; a valid one (from the same server) restores the
    # workspace after a reload, a forged or foreign one gets a fresh workspace instead.
    browser = space_app.raw()
    token = browser.call("adopt", [None]).data[0]
    folder = token.split(".")[0]
    reloaded = space_app.raw()
    assert reloaded.call("adopt", [token]).data[0] == token
    victim = next(path.name for path in space_app.workspaces().iterdir() if path.name != folder)
    folders = sorted(space_app.workspaces().iterdir())
    for forged in (f"{victim}.{'0' * 64}", f"{victim}.{token.split('.')[1]}", victim, "../../etc", 5):
        attacker = space_app.raw()
        answer = attacker.call("adopt", [forged]).data[0]
        assert answer != forged and not answer.startswith(victim)
        listed = attacker.call("list_gallery", []).data[0]
        assert not listed  # a fresh, empty workspace: not the victim's
    # Sessions that only look (a fresh id per request, as a script may send) leave no folder on the server's disk.
    assert sorted(space_app.workspaces().iterdir()) == folders and not (space_app.workspaces() / folder).exists()


def test_only_admins_change_the_model(login_app, space_app, alice):
    status = alice.predict(api_name="/model_status")
    for raw in (login_app.raw("bob"), space_app.raw()):
        outcome = raw.call("load_demo_model", [])
        assert not outcome.success and "only an admin" in outcome.error
        outcome = raw.call("set_memory_mode", ["full"])
        assert not outcome.success and "only an admin" in outcome.error
    assert alice.predict(api_name="/model_status") == status
    assert alice.predict("full", api_name="/set_memory_mode") == "Memory mode: **full**."


def _server_lora(folder: Path) -> str:
    """A LoRA for the tiny model in the server's own `loras/` folder (offered to every visitor); returns its name."""
    import torch

    from lens_core.lora import LensLora, save_lora
    from lens_core.tiny import TINY_TRANSFORMER_CONFIG
    from lens_core.transformer_lens import LensTransformer2DModel

    with torch.device("meta"):
        transformer = LensTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    generator, tensors = torch.Generator().manual_seed(7), {}
    modules = ["transformer_blocks.0.attn.img_qkv", "transformer_blocks.1.attn.to_out.0"]
    for name in modules:
        linear = transformer.get_submodule(name)
        tensors[name] = {
            "lora_A.weight": torch.randn(4, linear.in_features, generator=generator) * 0.5,
            "lora_B.weight": torch.randn(linear.out_features, 4, generator=generator) * 0.5,
        }
    lora = LensLora("house-style", tensors, dict.fromkeys(modules, 4), dict.fromkeys(modules, 4.0), {})
    save_lora(lora, folder / "loras" / "house-style.safetensors")
    return "loras/house-style.safetensors"


def test_one_visitors_active_lora_never_reaches_anothers_images(login_app, alice, bob):
    """ "Load in Generate tab" keeps a LoRA active until its user changes it (issue 10); on a shared server that is the
    loading visitor's own set: bob's next image (no LoRA list given) is his base image, not alice's style."""
    from lens_core.metadata import read_settings

    name = _server_lora(login_app.output_dir)
    message = alice.predict(name, api_name="/train_load_lora")[0]
    assert "Loaded" in message
    request = {"prompt": "lora isolation", "seed": 9, "api_name": "/generate", **SMALL}
    bob_files, _ = bob.predict(**request)
    alice_files, _ = alice.predict(**request)
    bob_image = login_app.workspaces() / user_folder_name("bob") / "images" / Path(bob_files[0]).name
    alice_image = login_app.workspaces() / user_folder_name("alice") / "images" / Path(alice_files[0]).name
    assert read_settings(bob_image).loras == []
    assert read_settings(alice_image).loras == [{"name": name, "weight": 1.0}]
    assert alice.predict(**request, loras=[])[1]["images"][0]["loras"] == []  # alice clears her own set
