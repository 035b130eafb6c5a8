"""Publishing a finished output folder to the Hugging Face Hub (the last step; the folder is complete first).

Options are named as in ``hf upload``. The token is passed to huggingface_hub only: it is never printed, logged,
written to the model card or put in the retry command.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from apo_merge.card import recorded_files
from apo_merge.errors import MergeError, first_line
from apo_merge.io.header import read_regular_file
from apo_merge.io.output import CARD_MARK, MAX_CARD_BYTES


@dataclass(frozen=True)
class PushOptions:
    """Where and how to upload (the ``hf upload`` options; the token travels separately)."""

    repo_id: str
    private: bool = False  # create the repo private if it does not exist yet
    revision: str | None = None  # branch to commit to, created from main when missing
    commit_message: str | None = None
    commit_description: str | None = None
    create_pr: bool = False  # open a pull request (against ``revision`` if given) instead of committing

    def retry_command(self, folder: str | os.PathLike) -> str:
        """The ``apo-merge push`` command line that repeats this upload alone (never with the token)."""
        args = ["apo-merge", "push", str(folder), self.repo_id]
        if self.private:
            args.append("--private")
        for flag, value in (
            ("--revision", self.revision),
            ("--commit-message", self.commit_message),
            ("--commit-description", self.commit_description),
        ):
            if value is not None:
                args += [flag, value]
        if self.create_pr:
            args.append("--create-pr")
        return shlex.join(args)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` and return the commit (or pull request) URL.

    Creates the repo when missing (``private`` applies then) and the branch ``revision`` when missing, as
    ``hf upload`` does. For trainers: one call per round's extrapolated checkpoint, e.g.
    ``push_folder(out, "me/model-apo", revision=f"round-{t}", commit_message=f"APO round {t}")``.
    Raises MergeError (exit code 1) naming the cause and the command that retries the upload alone.
    """
    options = PushOptions(
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        commit_description=commit_description,
        create_pr=create_pr,
    )
    return push(folder, options, token=token)


def push(folder: str | os.PathLike, options: PushOptions, *, token: str | bool | None = None) -> str:
    """``push_folder`` with the options in one object."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such folder to upload; give the output folder of apo-merge")
    _check_complete(folder)
    import huggingface_hub

    try:
        api = huggingface_hub.HfApi(token=token)
        repo_id = api.create_repo(options.repo_id, private=options.private or None, exist_ok=True).repo_id
        if options.revision is not None and not options.create_pr:
            api.create_branch(repo_id, branch=options.revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
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
