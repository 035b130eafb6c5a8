"""--push-to-hub and `apo-merge push`: the calls made to huggingface_hub.HfApi, failures, and the token's secrecy."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

from apo_merge import cli
from apo_merge.card import recorded_files, recorded_hash
from apo_merge.hub import PushOptions, push_folder
from apo_merge.io.hashing import hash_file
from tests.checkpoints import make_checkpoint
from tests.merge.helpers import run_main

TOKEN = "hf_SeCrEtT0kenDoNotLeak123"


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records every call; ``fail`` makes upload_folder raise it."""

    calls: list[tuple[str, dict]] = []
    fail: BaseException | None = None

    def __init__(self, **kwargs) -> None:
        self.calls.append(("HfApi", kwargs))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        kwargs["files"] = sorted(p.name for p in folder.iterdir())  # what the upload would have found
        self.calls.append(("upload_folder", kwargs))
        if self.fail is not None:
            raise self.fail
        rev = kwargs.get("revision") or "main"
        return SimpleNamespace(
            commit_url=f"https://hf.co/{kwargs['repo_id']}/commit/{rev}",
            pr_url="https://hf.co/pr/1" if kwargs.get("create_pr") else None,
        )


@pytest.fixture
def api(monkeypatch):
    RecordingApi.calls, RecordingApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("push-pair")
    return make_checkpoint(root / "prev", seed=0), make_checkpoint(root / "cur", seed=1)


def _invoke(args: list[str]):
    """Through the console script's own entry point (its routing of `push` and `verify` included)."""
    return run_main(cli.main, *args)


def _assert_complete(out: Path) -> None:
    text = (out / "README.md").read_text()
    recorded = recorded_files(text)
    assert recorded
    for name, (size, sha) in recorded.items():
        assert hash_file(out / name, name=recorded_hash(text)) == (size, sha)


def _assert_no_token(result, out: Path, caplog) -> None:
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    assert TOKEN not in caplog.text
    for f in out.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def test_merge_then_push_makes_the_hf_upload_calls(api, pair, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    result = _invoke(
        [
            str(pair[0]),
            str(pair[1]),
            "--alpha",
            "0.3",
            "-o",
            str(out),
            "--device",
            "cpu",
            "--push-to-hub",
            "me/apo",
            "--private",
            "--revision",
            "round-2",
            "--commit-message",
            "APO round 2",
            "--commit-description",
            "alpha 0.3",
            "--token",
            TOKEN,
        ]
    )
    assert result.code == 0, result.stderr
    assert [c[0] for c in api.calls] == ["HfApi", "create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == {"token": TOKEN}
    assert api.calls[1][1] == {"repo_id": "me/apo", "private": True, "exist_ok": True}
    assert api.calls[2][1] == {"repo_id": "me/apo", "branch": "round-2", "exist_ok": True}
    upload = api.calls[3][1]
    assert upload == {
        "repo_id": "me/apo",
        "folder_path": out,
        "revision": "round-2",
        "create_pr": False,
        "commit_message": "APO round 2",
        "commit_description": "alpha 0.3",
        "files": sorted(p.name for p in out.iterdir()),
    }
    assert "README.md" in upload["files"] and "model.safetensors" in upload["files"]
    assert "https://hf.co/me/apo/commit/round-2" in result.stdout
    _assert_complete(out)
    _assert_no_token(result, out, caplog)


def test_pull_request_skips_the_branch_and_defaults_stay_unset(api, pair, tmp_path):
    out = tmp_path / "out"
    result = _invoke(
        [
            str(pair[0]),
            str(pair[1]),
            "--alpha",
            "0.3",
            "-o",
            str(out),
            "--push-to-hub",
            "me/apo",
            "--create-pr",
            "--device",
            "cpu",
        ]
    )
    assert result.code == 0, result.stderr
    assert [c[0] for c in api.calls] == ["HfApi", "create_repo", "upload_folder"]
    assert api.calls[0][1] == {"token": None} and api.calls[1][1]["private"] is None
    assert api.calls[2][1]["create_pr"] is True and api.calls[2][1]["revision"] is None
    assert "https://hf.co/pr/1" in result.stdout


def test_upload_failure_keeps_out_exits_1_and_prints_the_retry_command(api, pair, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    api.fail = ConnectionError(f"connection reset while sending Authorization: Bearer {TOKEN}")
    out = tmp_path / "my out"
    result = _invoke(
        [
            str(pair[0]),
            str(pair[1]),
            "--alpha",
            "0.3",
            "-o",
            str(out),
            "--device",
            "cpu",
            "--push-to-hub",
            "me/apo",
            "--revision",
            "dev",
            "--commit-message",
            "round 3 (apo)",
            "--token",
            TOKEN,
        ]
    )
    assert result.code == 1
    err = result.stderr
    assert "ConnectionError: connection reset" in err and "the folder is complete" in err
    _assert_complete(out)
    _assert_no_token(result, out, caplog)
    command = err.split("retry the upload alone with: ", 1)[1].split(" (after", 1)[0].strip()
    assert command == shlex.join(
        ["apo-merge", "push", str(out), "me/apo", "--revision", "dev", "--commit-message", "round 3 (apo)"]
    )
    # the printed command, run as is, does the upload alone
    api.calls, api.fail = [], None
    retry = _invoke(shlex.split(command)[1:])
    assert retry.code == 0, retry.stderr
    assert [c[0] for c in api.calls] == ["HfApi", "create_repo", "create_branch", "upload_folder"]
    assert api.calls[3][1]["commit_message"] == "round 3 (apo)" and api.calls[3][1]["folder_path"] == out


def test_push_refuses_an_incomplete_output(api, pair, tmp_path):
    out = tmp_path / "out"
    assert _invoke([str(pair[0]), str(pair[1]), "--alpha", "0.3", "-o", str(out), "--device", "cpu"]).code == 0
    with open(out / "model.safetensors", "ab") as f:
        f.write(b"x")
    result = _invoke(["push", str(out), "me/apo"])
    assert result.code == 1 and "model.safetensors is missing or not" in result.stderr
    assert api.calls == []


def test_hub_options_without_push_to_hub_are_usage_errors(pair, tmp_path):
    result = _invoke([str(pair[0]), str(pair[1]), "--alpha", "0.3", "-o", str(tmp_path / "o"), "--private"])
    assert result.code == 2 and "--push-to-hub" in result.stderr
    assert not (tmp_path / "o").exists()


def test_push_folder_for_trainers(api, tmp_path):
    folder = tmp_path / "round-3"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    url = push_folder(folder, "me/run", revision="round-3", commit_message="APO round 3", token=TOKEN)
    assert url == "https://hf.co/me/run/commit/round-3"
    assert api.calls[2][1]["branch"] == "round-3" and api.calls[3][1]["commit_message"] == "APO round 3"


def test_retry_command_quotes_and_never_holds_the_token():
    options = PushOptions("me/x", private=True, commit_description="it's $HOME; rm -rf /", create_pr=True)
    cmd = options.retry_command(Path("out dir"))
    assert shlex.split(cmd) == [
        "apo-merge",
        "push",
        "out dir",
        "me/x",
        "--private",
        "--commit-description",
        "it's $HOME; rm -rf /",
        "--create-pr",
    ]


def test_python_api_pushes_after_the_merge(api, pair, tmp_path):
    from apo_merge.api import run_merge
    from apo_merge.options import MergeOptions

    report = run_merge(
        pair[0],
        pair[1],
        MergeOptions(0.3, device="cpu", token=TOKEN, push_to_hub=PushOptions("me/apo", create_pr=True)),
        tmp_path / "out",
    )
    assert report.pushed == "https://hf.co/pr/1"
    assert api.calls[0][1] == {"token": TOKEN} and api.calls[-1][1]["folder_path"] == tmp_path / "out"


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt(), 130), (None, 143)])
def test_an_interrupted_upload_says_out_is_complete_and_how_to_retry(api, pair, tmp_path, stop, code):
    """The upload runs inside the API (MergeOptions.push_to_hub); its interruption is worded by apo_merge.hub."""
    from apo_merge.shell import Terminated

    api.fail = stop if stop is not None else Terminated()
    out = tmp_path / "out"
    args = [str(pair[0]), str(pair[1]), "--alpha", "0.3", "-o", str(out), "--device", "cpu"]
    result = _invoke([*args, "--push-to-hub", "me/apo", "--revision", "r2"])
    assert result.code == code
    word = "interrupted" if code == 130 else "terminated"
    assert f"upload {word}; {out} is complete; retry with: apo-merge push {out} me/apo --revision r2" in result.stderr
    _assert_complete(out)


def test_push_options_come_from_one_field_list():
    """The retry command and both CLIs take PushOptions' fields: a flag per field, no list written out twice."""
    from apo_merge.cliopts import flag_name, options_of

    flags = {flag_name(f) for f in options_of(PushOptions).values() if not f.metadata.get("argument")}
    assert flags == {"--private", "--revision", "--commit-message", "--commit-description", "--create-pr"}
    for command in (["--help"], ["push", "--help"]):
        text = _invoke(command).stdout
        assert all(flag in text for flag in flags), command
