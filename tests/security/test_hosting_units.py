"""The pieces behind `shared` mode, without a server: how the mode is decided, workspace confinement (symlinks
too), signed anonymous ids, upload limits, server-configured backends, the Train tab's setting allowlist, the login
throttle's rule, and the engine's refusals (variant reloads, seeds past the top, long negative prompts)."""

from __future__ import annotations

import io
import os
import stat
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app.backends import load_backends
from app.login_throttle import LoginThrottle
from app.settings import AppSettings, parse_args
from app.train_tab import TrainRequest, shared_setting_keys
from app.uploads import UploadError, UploadLimits, delete_dataset, extract_dataset_zip, save_dataset_files
from app.workspace import WorkspaceError, Workspaces, folder_bytes, user_folder_name
from lens_core.engine import MAX_SEED, EngineConfig, GenerationCancelled, GenerationRequest, LensEngine
from lens_core.rewriter import RewriterSettings


@pytest.mark.parametrize(
    ("argv", "environ", "mode"),
    [
        ([], {}, "personal"),
        (["--host", "127.0.0.1"], {}, "personal"),
        (["--host", "localhost"], {}, "personal"),
        (["--host", "::1"], {}, "personal"),
        (["--host", "0.0.0.0"], {}, "shared"),
        ([], {"GRADIO_SERVER_NAME": "0.0.0.0"}, "shared"),
        (["--share"], {}, "shared"),
        (["--auth", "a:b"], {}, "shared"),
        ([], {"LENS_AUTH": "a:b"}, "shared"),
        ([], {"SPACE_ID": "me/lens"}, "shared"),
        (["--shared"], {}, "shared"),
    ],
)
def test_the_mode_is_personal_only_on_loopback_without_logins_links_or_spaces(argv, environ, mode, monkeypatch):
    for name in ("LENS_AUTH", "SPACE_ID", "GRADIO_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    settings = parse_args(argv)
    hosting = settings.hosting_mode()
    assert hosting.name == mode
    assert ("**shared**" in hosting.banner()) == (mode == "shared")


def test_a_space_is_configured_by_its_variables(tmp_path, monkeypatch):
    backends = tmp_path / "backends.yaml"
    backends.write_text("recaption: {vlm: {base_url: 'http://127.0.0.1:9/v1', model: m}}\n")
    for name, value in {"SPACE_ID": "me/lens", "LENS_AUTH": "ann:pw,bob:pw", "LENS_ADMINS": "ann",
                        "LENS_BACKENDS": str(backends), "LENS_OUTPUT_DIR": str(tmp_path / "data")}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    settings = parse_args([])
    assert settings.hosting_mode().shared and settings.admins == ["ann"]
    assert settings.output_dir == tmp_path / "data" and "vlm" in settings.server_backends().recaption


def test_admins_must_be_logins(capsys, monkeypatch):
    monkeypatch.delenv("LENS_AUTH", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--auth", "ann:pw", "--admin", "bob"])
    assert "not a login" in capsys.readouterr().err
    assert parse_args(["--auth", "ann:pw,bob:pw", "--admin", "ann,bob"]).admins == ["ann", "bob"]


def test_a_workspace_confines_every_path_and_symlink(tmp_path):
    workspaces = Workspaces(tmp_path / "out", shared=True)
    mine = workspaces.for_login("ann")
    (mine.images).mkdir(parents=True)
    (mine.images / "a.png").write_bytes(b"x")
    outside = tmp_path / "secret"
    outside.mkdir()
    (mine.uploads).mkdir()
    (mine.uploads / "link").symlink_to(outside)
    assert mine.resolve("images/a.png") == mine.images / "a.png"
    for path in ("/etc", "../../secret", str(outside), "uploads/link", "uploads/link/x", "images/../../x"):
        with pytest.raises(WorkspaceError, match="outside your workspace"):
            mine.resolve(path)
    for name in ("..", "a/b", "a\\b", ""):
        with pytest.raises(WorkspaceError):
            mine.child("images", name)
    theirs = workspaces.for_login("Ann")  # a different login that cleans up alike
    assert theirs.root != mine.root and user_folder_name("ann") != user_folder_name("Ann")
    with pytest.raises(WorkspaceError):
        mine.resolve(theirs.root / "images")


def test_anonymous_ids_are_signed_and_the_secret_is_private(tmp_path):
    workspaces = Workspaces(tmp_path / "out", shared=True)
    secret = tmp_path / "out" / ".lens-workspace-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    token = workspaces.adopt("session-a", None)
    folder, signature = token.split(".")
    assert workspaces.for_session("session-a").root.name == folder
    assert workspaces.adopt("session-b", token) == token  # a reload of the same browser
    assert workspaces.for_session("session-b").root.name == folder
    forged = f"anon-{'1' * 32}.{signature}"
    assert workspaces.adopt("session-c", forged) != forged
    restarted = Workspaces(tmp_path / "out", shared=True)  # the same secret after a restart
    assert restarted.adopt("session-d", token) == token
    other_server = Workspaces(tmp_path / "other", shared=True)
    assert other_server.adopt("session-e", token) != token


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, bytes], **kwargs) -> Path:
    with zipfile.ZipFile(path, "w", **kwargs) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("members", "limits", "message"),
    [
        ({f"{i}.png": b"x" for i in range(6)}, UploadLimits(max_members=5), "6 entries; the limit is 5"),
        ({"a.png": b"x" * 5000}, UploadLimits(max_total_bytes=4000), "unpacks to 0.00 GiB"),
        ({"/abs.png": b"x"}, UploadLimits(), "unsafe path"),
        ({"C:/win.png": b"x"}, UploadLimits(), "unsafe path"),
        ({"a\\..\\b.png": b"x"}, UploadLimits(), "backslashes"),
        ({"a/../../b.png": b"x"}, UploadLimits(), "unsafe path"),
        ({"x" * 300 + ".png": b"x"}, UploadLimits(), "the limit is 255"),
        ({"notes.exe": b"x"}, UploadLimits(), "holds no images"),
    ],
)
def test_zip_limits_refuse_before_writing(tmp_path, members, limits, message):
    archive = _zip(tmp_path / "in.zip", members)
    with pytest.raises(UploadError, match=message):
        extract_dataset_zip(archive, tmp_path / "uploads" / "set", limits)
    assert not (tmp_path / "uploads").exists() or not list((tmp_path / "uploads").iterdir())


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the duplicate is the point
def test_zip_links_encryption_duplicates_and_bombs_are_refused_and_leave_nothing(tmp_path):
    link = zipfile.ZipInfo("link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as archive:
        archive.writestr(link, "/etc/passwd")
    cases = {
        "link.zip": "symbolic link",
        "dupe.zip": "twice",
        "bomb.zip": "times larger than it is packed",
    }
    with zipfile.ZipFile(tmp_path / "dupe.zip", "w") as archive:
        archive.writestr("a.png", _png())
        archive.writestr("a.png", _png())
    _zip(tmp_path / "bomb.zip", {"ok.png": _png(), "big.png": bytes(8 * 1024**2)}, compression=zipfile.ZIP_DEFLATED)
    for name, message in cases.items():
        with pytest.raises(UploadError, match=message):
            extract_dataset_zip(tmp_path / name, tmp_path / "uploads" / name, UploadLimits(max_ratio=50))
    assert not list((tmp_path / "uploads").iterdir())  # no partial folder either


def test_good_zips_and_loose_images_become_one_folder(tmp_path):
    archive = _zip(
        tmp_path / "in.zip", {"set/a.png": _png(), "set/a.txt": b"cap", "__MACOSX/._a.png": b"", "x.exe": b""}
    )
    result = extract_dataset_zip(archive, tmp_path / "uploads" / "one")
    assert sorted(p.relative_to(result.folder).as_posix() for p in result.folder.rglob("*.*")) == [
        "set/a.png",
        "set/a.txt",
    ]
    assert result.skipped == ["x.exe"] and "skipped 1 file" in result.summary()
    (tmp_path / "b c.png").write_bytes(_png())
    result = save_dataset_files([tmp_path / "b c.png", tmp_path / "in.zip"], tmp_path / "uploads" / "two")
    assert [p.name for p in result.folder.iterdir()] == ["b-c.png"] and result.skipped == ["in.zip"]


def test_backends_come_from_the_server_only(tmp_path):
    path = tmp_path / "backends.yaml"
    path.write_text("recaption:\n  vlm: {base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: KEY}\n")
    backends = load_backends(path, RewriterSettings(), shared=True)
    assert sorted(backends.recaption) == ["demo", "vlm"] and sorted(backends.rewriter) == ["openai"]
    with pytest.raises(ValueError, match="Unknown rewriter backend 'http://evil/v1'"):
        backends.rewriter_settings("http://evil/v1")
    assert "local" in load_backends(None, RewriterSettings(), shared=False).rewriter
    for text, message in (
        ("rewriter: {x: {base_url: 'ftp://a', model: m}}", "must start with http"),
        ("rewriter: {x: {base_url: 'http://a', api_key_env: 'sk-123 secret'}}", "variable NAME"),
        ("recaption: {x: {backend: local}}", "needs model"),
        ("other: {}", "two sections"),
        ("rewriter: {x: {url: 'http://a'}}", "unknown key"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_backends(path, RewriterSettings(), shared=True)


def test_train_settings_that_name_paths_are_refused_in_shared_mode():
    allowed = shared_setting_keys()
    for key in ("output_dir", "name", "preset", "model.path", "model.transformer_file", "data.path", "data.cache_dir"):
        assert key not in allowed
        with pytest.raises(ValueError, match="cannot be set on this shared server"):
            TrainRequest("d", "", "16gb", "run", 10, 1e-4, 4, "", "", f"{key}=/tmp/x").check_shared()
    TrainRequest("d", "", "16gb", "run", 10, 1e-4, 4, "", "", "loop.batch_size=2\ndata.repeats=3").check_shared()


def test_login_throttle_doubles_the_wait_after_five_failures_and_a_success_clears_it():
    now = [0.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    for _ in range(5):
        assert throttle.wait_s("ann", "1.2.3.4") == 0
        throttle.failed("ann", "1.2.3.4")
    assert throttle.wait_s("ann", "1.2.3.4") == 1.0
    assert throttle.wait_s("bob", "5.6.7.8") == 0  # another login elsewhere is not affected
    now[0] = 1.0
    throttle.failed("ann", "1.2.3.4")
    assert throttle.wait_s("ann", "1.2.3.4") == 2.0
    now[0] = 3.0
    throttle.succeeded("ann", "1.2.3.4")
    assert throttle.wait_s("ann", "1.2.3.4") == 0


def test_login_throttle_in_a_running_app(tmp_path):
    """Gradio's own /login behind the middleware: 30 wrong passwords, then the right one, is refused (429)."""
    import gradio as gr
    import httpx

    from app.access import Hosting
    from app.ui import launch_options

    settings = AppSettings(output_dir=tmp_path, auth=[("ann", "right"), ("bob", "other")], host="127.0.0.1")
    hosting = Hosting.from_settings(settings)
    with gr.Blocks() as demo:
        gr.Markdown("hello")
    options = {**launch_options(settings, hosting), "server_port": None, "prevent_thread_lock": True, "quiet": True}
    # The app's own middleware, with a clock that stands still: the waits never run out while the test logs in,
    # however slowly a loaded machine sends the 31 requests.
    (throttling,) = options["app_kwargs"]["middleware"]
    throttling.kwargs["throttle"] = LoginThrottle(clock=lambda: 0.0)
    demo.launch(**options)
    try:
        http = httpx.Client(base_url=demo.local_url)
        codes = [http.post("login", data={"username": "ann", "password": f"wrong{i}"}).status_code for i in range(30)]
        assert codes[:5] == [400] * 5 and set(codes[5:]) == {429}
        refused = http.post("login", data={"username": "ann", "password": "right"})
        assert refused.status_code == 429 and "Too many failed logins" in refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert http.post("login", data={"username": "bob", "password": "other"}).status_code == 200
    finally:
        demo.close()


def test_engine_refusals_and_the_cancel_count(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="can be at most 4294967294"):
        GenerationRequest(prompt="a fox", seed=MAX_SEED, batch_size=2, width=64, height=64)
    GenerationRequest(prompt="a fox", seed=MAX_SEED - 1, batch_size=2, width=64, height=64)
    with pytest.raises(ValueError, match="negative prompt has 1260000 characters; the limit is 4000"):
        GenerationRequest(prompt="a fox", negative_prompt="x" * 1_260_000, width=64, height=64)
    engine = LensEngine(EngineConfig(output_dir=tmp_path, model=str(tiny_checkpoint)))
    engine.load(variant="Lens-Turbo")
    engine.model_label = "microsoft/Lens-Turbo"  # a Hub model: another variant is another checkpoint
    with pytest.raises(ValueError, match="only an admin can do"):
        engine.set_variant("Lens", allow_reload=False)
    engine.model_label = str(tiny_checkpoint)
    cancel = threading.Event()
    request = GenerationRequest(prompt="a fox", seed=1, batch_count=4, width=64, height=64, num_inference_steps=2)

    def on_progress(event):
        if event.batch_index == 2:
            cancel.set()

    workspace = tmp_path / "users" / "ann"
    with pytest.raises(GenerationCancelled, match="batch 3 of 4; 2 of 4 images were saved") as caught:
        engine.generate(request, on_progress, cancel, workspace=workspace)
    assert [path.parent for path in caught.value.saved] == [(workspace / "images").resolve()] * 2
    assert all(stat.S_IMODE(os.stat(path).st_mode) == 0o644 for path in caught.value.saved)


def test_a_shared_gallery_lists_every_workspace_only_when_asked(tmp_path):
    from app.gallery_tab import list_images

    workspaces = Workspaces(tmp_path / "out", shared=True)
    for login in ("ann", "bob"):
        images = workspaces.for_login(login).images
        images.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(images / f"{login}.png")
    assert [path.name for path in list_images([workspaces.for_login("ann").images])] == ["ann.png"]
    assert sorted(path.name for path in list_images(workspaces.all_image_folders())) == ["ann.png", "bob.png"]


def test_gradio_cleans_its_temporary_copies(tmp_path):
    """Gradio's cache (uploads, images shown on the page) is emptied of anything older than an hour."""
    from app.access import Hosting
    from app.ui import DELETE_CACHE, build_ui, launch_options, queue_options

    settings = AppSettings(output_dir=tmp_path, model="tiny", shared=True)
    hosting = Hosting.from_settings(settings)
    demo = build_ui(LensEngine(EngineConfig(output_dir=tmp_path, model="tiny")), settings, hosting)
    assert demo.delete_cache == DELETE_CACHE == (600, 3600)
    assert "allowed_paths" not in launch_options(settings, hosting)  # no output folder is served by path
    assert queue_options(settings, hosting)["api_open"] is False


def test_a_workspace_quota_caps_uploads_and_a_refused_upload_leaves_nothing(tmp_path):
    """An upload must fit in what the caller's workspace has left (zip directory and loose files alike); the message
    says how much is left and how to make room."""
    archive = _zip(tmp_path / "in.zip", {"a.png": b"x" * 5000, "b.png": b"y" * 5000})
    with pytest.raises(UploadError, match=r"but your workspace has only 0.00 GiB left: delete datasets"):
        extract_dataset_zip(archive, tmp_path / "uploads" / "set", UploadLimits(room_bytes=9000))
    (tmp_path / "big.png").write_bytes(b"z" * 5000)
    with pytest.raises(UploadError, match="your workspace has only"):
        save_dataset_files([tmp_path / "big.png"], tmp_path / "uploads" / "loose", UploadLimits(room_bytes=-10))
    assert not (tmp_path / "uploads").exists() or not list((tmp_path / "uploads").iterdir())
    assert extract_dataset_zip(archive, tmp_path / "uploads" / "ok", UploadLimits(room_bytes=10_000)).files == 2


def test_the_quota_counts_files_once_and_never_through_links(tmp_path):
    root = tmp_path / "ws"
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.bin").write_bytes(b"x" * 1000)
    os.link(root / "a" / "one.bin", root / "a" / "same.bin")  # recaption links images into an output folder
    (tmp_path / "outside.bin").write_bytes(b"y" * 50_000)
    (root / "link.bin").symlink_to(tmp_path / "outside.bin")
    (root / "dir-link").symlink_to(tmp_path)
    assert folder_bytes(root) == 1000


def test_quota_refuses_work_in_a_full_workspace_only_in_shared_mode(tmp_path):
    import gradio as gr

    from app.access import Hosting

    settings = AppSettings(output_dir=tmp_path, shared=True, workspace_limit_bytes=4000)
    hosting = Hosting.from_settings(settings)
    workspace = hosting.workspaces.for_login("ann")
    assert hosting.room_bytes(workspace) == 4000 and hosting.upload_limits_for(workspace).room_bytes == 4000
    workspace.images.mkdir(parents=True)
    (workspace.images / "x.png").write_bytes(b"x" * 4000)
    with pytest.raises(gr.Error, match=r"Your workspace is full .* so a new image cannot start: delete images"):
        hosting.require_room(workspace, "a new image")
    personal = Hosting.personal(tmp_path / "mine")
    assert personal.room_bytes(personal.workspaces.personal()) is None  # the person at the machine has no quota
    personal.require_room(personal.workspaces.personal(), "a new image")


def test_quota_flags_are_checked(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--workspace-limit-gb", "1", "--upload-limit-gb", "2"])
    assert "a full-size upload could never fit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--anonymous-days", "-1"])
    assert "--anonymous-days must be 0" in capsys.readouterr().err
    settings = parse_args(["--workspace-limit-gb", "0", "--anonymous-days", "0"])
    assert settings.workspace_limit_bytes == 0 and settings.anonymous_days == 0


def test_idle_anonymous_workspaces_expire_and_login_workspaces_never_do(tmp_path):
    workspaces = Workspaces(tmp_path, shared=True)
    idle = workspaces.for_session("s-idle")
    busy = workspaces.for_session("s-busy")  # old folder, but a job wrote a file in it recently
    recent = workspaces.for_session("s-recent")
    login = workspaces.for_login("ann")
    assert not workspaces.users_root.exists()  # asking for a workspace writes nothing; the first file does
    for workspace in (recent, login):
        (workspace.root / "images").mkdir(parents=True)
    (busy.root / "training").mkdir(parents=True)
    (busy.root / "training" / "progress.jsonl").write_text("{}\n")
    (idle.root / "images").mkdir(parents=True)
    (idle.root / "images" / "a.png").write_bytes(b"x")
    old = time.time() - 20 * 86400
    for path in (idle.root, idle.root / "images", idle.root / "images" / "a.png", busy.root, login.root):
        os.utime(path, (old, old))
    assert workspaces.expire_anonymous(14) == [idle.root.name]
    assert not idle.root.exists() and busy.root.exists() and recent.root.exists() and login.root.exists()
    fresh = workspaces.for_session("s-idle")  # the browser comes back: a new, empty workspace
    assert fresh.root != idle.root and not fresh.root.exists()
    assert Workspaces(tmp_path / "personal", shared=False).expire_anonymous(0) == []


def test_a_visitor_deletes_only_their_own_uploaded_datasets(tmp_path):
    workspace = Workspaces(tmp_path, shared=True).for_login("ann")
    (workspace.uploads / "upload-1").mkdir(parents=True)
    (workspace.uploads / "upload-1" / "a.png").write_bytes(_png())
    outside = tmp_path / "server-data"
    outside.mkdir()
    (outside / "keep.png").write_bytes(_png())
    (workspace.uploads / "linked").symlink_to(outside)
    for name, message in (("../images", "not one of your datasets"), ("linked", "outside your workspace"),
                          ({"x": 1}, "not one of your datasets"), ("", "not one of your datasets")):  # fmt: skip
        with pytest.raises((UploadError, WorkspaceError), match=message):
            delete_dataset(workspace.uploads, name, workspace.resolve)
    assert (outside / "keep.png").exists()
    delete_dataset(workspace.uploads, "upload-1", workspace.resolve)
    assert not (workspace.uploads / "upload-1").exists()
