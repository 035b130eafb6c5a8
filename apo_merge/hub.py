"""Publishing a finished output folder to the Hugging Face Hub (the last step; the folder is complete first).

Options are named as in ``hf upload``. The token is passed to huggingface_hub only: it is never printed, logged,
written to the model card or put in the retry command.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apo_merge.card import recorded_files
from apo_merge.cliopts import flag_name, options_of, setting
from apo_merge.errors import MergeError, first_line
from apo_merge.io.header import read_regular_file
from apo_merge.io.output import CARD_MARK, MAX_CARD_BYTES


@dataclass(frozen=True)
class PushOptions:
    """Where and how to upload (the ``hf upload`` options; the token travels separately). Each field is a flag of
    ``apo-merge push`` and, with ``--push-to-hub REPO_ID``, of ``apo-merge`` itself (see apo_merge.cliopts)."""

    repo_id: str = setting(help="Hub model repo, e.g. me/model-apo.", argument=True, metavar="REPO_ID")
    private: bool = setting(False, "Create the Hub repo private (when it does not exist yet).")
    revision: str | None = setting(None, "Hub branch to commit to; created from main when missing.")
    commit_message: str | None = setting(None, "Summary line of the Hub commit.")
    commit_description: str | None = setting(None, "Description of the Hub commit.")
    create_pr: bool = setting(False, "Open a Hub pull request instead of committing.")

    def retry_command(self, folder: str | os.PathLike) -> str:
        """The ``apo-merge push`` command line that repeats this upload alone (never with the token)."""
        return retry_command(folder, self)


def retry_command(folder: str | os.PathLike, options: str | PushOptions) -> str:
    """``apo-merge push OUT REPO_ID`` and each flag whose value is not its default, from PushOptions' fields."""
    if isinstance(options, str):
        return shlex.join(["apo-merge", "push", str(folder), options])
    args = ["apo-merge", "push", str(folder), options.repo_id]
    for f in options_of(PushOptions).values():
        value = getattr(options, f.name)
        if f.metadata.get("argument") or value == f.default:
            continue
        args += [flag_name(f)] if value is True else [flag_name(f), str(value)]
    return shlex.join(args)


def push_folder(
    folder: str | os.PathLike, repo_id: str | PushOptions, *, token: str | bool | None = None, **settings: Any
) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` and return the commit (or pull request) URL.

    ``settings`` are the other fields of PushOptions (``private``, ``revision``, ``commit_message``,
    ``commit_description``, ``create_pr``); ``repo_id`` may also be a whole PushOptions. Creates the repo when
    missing (``private`` applies then) and the branch ``revision`` when missing, as ``hf upload`` does. For
    trainers: one call per round's extrapolated checkpoint, e.g.
    ``push_folder(out, "me/model-apo", revision=f"round-{t}", commit_message=f"APO round {t}")``.
    Raises MergeError (exit code 1) naming the cause and the command that retries the upload alone.
    """
    options = repo_id if isinstance(repo_id, PushOptions) else PushOptions(repo_id, **settings)  # the one place
    if settings and options is repo_id:
        raise TypeError("push_folder: give either a PushOptions or a repo id with settings, not both")
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such folder to upload; give the output folder of apo-merge")
    _check_complete(folder)
    import huggingface_hub

    try:
        api = huggingface_hub.HfApi(token=token)
        repo = api.create_repo(options.repo_id, private=options.private or None, exist_ok=True).repo_id
        if options.revision is not None and not options.create_pr:
            api.create_branch(repo, branch=options.revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            revision=options.revision,
            create_pr=options.create_pr,
            commit_message=options.commit_message or f"Upload {folder.name} (apo-merge)",
            commit_description=options.commit_description,
        )
    except Exception as e:  # noqa: BLE001 - any failure of the upload becomes one message with the retry command
        cause = _scrub(f"{type(e).__name__}: {first_line(e)}", token)
        login = " (after `hf auth login` or with HF_TOKEN set)" if isinstance(token, str) else ""
        raise MergeError(
            f"upload of {folder} to {options.repo_id} failed ({cause}); the folder is complete; "
            f"retry the upload alone with: {options.retry_command(folder)}{login}"
        ) from None
    return getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)


def push(folder: str | os.PathLike, options: str | PushOptions, *, token: str | bool | None = None) -> str:
    """The upload of a finished apo-merge output (``MergeOptions.push_to_hub``, ``apo-merge push``): as
    ``push_folder``, and Ctrl-C or SIGTERM during it ends in the one line that says OUT is complete and gives the
    command that retries the upload alone (exit 130 or 143)."""
    try:
        return push_folder(folder, options, token=token)
    except BaseException as e:
        from apo_merge.shell import interrupted, interruption

        stop = interruption(e)
        if stop is None:
            raise
        retry = retry_command(folder, options)
        raise interrupted(stop, f"{folder} is complete; retry with: {retry}", "upload") from None


def _check_complete(folder: Path) -> None:
    """An apo-merge output must hold every weight file its card records, at the recorded size."""
    readme = folder / "README.md"
    try:  # a regular file only: a FIFO named README.md must not block the upload
        text = read_regular_file(readme, MAX_CARD_BYTES).decode("utf-8", errors="replace")
    except (OSError, MergeError):
        text = ""
    if CARD_MARK not in text:
        return
    for name, (size, _) in recorded_files(text).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise MergeError(
                f"{folder}: {name} is missing or not {size} bytes as its model card records; "
                "rerun the merge instead of uploading this folder"
            )


def _scrub(text: str, token: str | bool | None) -> str:
    return text.replace(token, "<token>") if isinstance(token, str) and token else text
