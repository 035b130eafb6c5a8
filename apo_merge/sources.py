"""Where PREV and CUR come from: a local folder, or a Hugging Face Hub repo id resolved through the Hub cache.

A spec names the Hub only when no local file or folder of that name exists and it reads ``org/name`` or
``org/name@revision`` (a branch, tag or commit). Hub repos are fetched with ``snapshot_download`` into the normal
cache (``HF_HOME`` / ``HF_HUB_CACHE``), which honours ``HF_HUB_OFFLINE=1``; only top-level safetensors weights, the
index and the small non-weight files (config, tokenizer, chat template, license) are fetched, never pickles.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from apo_merge.errors import MergeError, first_line, usage_error
from apo_merge.io.checkpoint import WEIGHT_SUFFIXES

# fnmatch patterns, as huggingface_hub applies them: `*` also matches `/`, hence the "*/*" ignore (top level only).
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.tiktoken",
    "*.py",
    "tokenizer*",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
]
HUB_IGNORE_PATTERNS = ["*/*", *(f"*{suffix}" for suffix in WEIGHT_SUFFIXES if suffix != ".safetensors")]

ADAPTER_CONFIG = "adapter_config.json"  # marks a PEFT adapter folder
CardPaths = Literal["relative", "absolute"]  # how the model card names local inputs

_HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?")


@dataclass(frozen=True)
class Source:
    path: Path  # local folder
    label: str  # as the user gave it
    trusted_root: Path  # symlinks may resolve anywhere below this
    hub_id: str | None = None  # "org/name" (with "@revision" stripped) when it came from the Hub
    revision: str | None = None  # the revision asked for ("@dev"), None for the default branch
    commit: str | None = None  # the Hub commit the files came from

    @property
    def is_adapter(self) -> bool:
        """A PEFT adapter folder (adapter_config.json) rather than a full checkpoint."""
        return os.path.lexists(self.path / ADAPTER_CONFIG)  # any kind of file: a FIFO is refused when read

    @property
    def description(self) -> str:
        """How the model card (and the weight files' metadata) name this input; see ``card_name``."""
        return self.card_name("relative")

    def card_name(self, paths: CardPaths = "relative") -> str:
        """The published name of this input: ``repo@commit`` for Hub inputs; for local ones the path as given when
        it is relative, else only the folder's name, so that a pushed card does not show the user's file system
        (``paths="absolute"``: the absolute path, on request). Non-UTF-8 bytes are written as ``\\xNN``."""
        if self.hub_id:
            text = f"{self.hub_id}@{self.commit}" if self.commit else self.label
        elif paths == "absolute":
            text = os.path.abspath(self.path)
        elif paths == "relative":
            given = os.path.expanduser(self.label)
            text = os.path.normpath(given) if not os.path.isabs(given) else ""
            if not text or text in (".", "..") or text.startswith(".." + os.sep):
                text = Path(os.path.abspath(self.path)).name or os.sep  # the folder's own name
        else:
            raise MergeError(f"--card-paths {paths!r} is not one of relative, absolute", exit_code=2)
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def show_path(path: str | os.PathLike, limit: int = 40) -> str:
    """A path for a one-line message: each name longer than ``limit`` characters cut short."""
    parts = str(path).split(os.sep)
    return os.sep.join(p if len(p) <= limit else p[: limit - 3] + "..." for p in parts)


def lexists(path: Path, what: str, *, usage: bool = False) -> bool:
    """Whether ``path`` exists (a dangling symlink does); a path the system cannot even look up is a MergeError
    (a usage error, exit 2, with ``usage``: the path is a command-line value such as -o)."""
    try:
        os.lstat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        problem = (
            "a name in it is longer than the file system allows (255 bytes); use a shorter name"
            if e.errno == errno.ENAMETOOLONG
            else f"cannot look it up ({e.strerror or e}); check the path and permissions"
        )
    except ValueError:  # a NUL byte
        problem = "not a valid path (it holds a NUL byte)"
    if usage:
        raise usage_error(f"{what} {show_path(path)}: {problem}")
    raise MergeError(f"{what} {show_path(path)}: {problem}")


def parse_hub_spec(spec: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``spec`` cannot be a Hub repo id."""
    m = _HUB_SPEC.fullmatch(spec)
    if not m or "--" in m["repo"] or ".." in m["repo"] or m["repo"].endswith((".", "-")) or len(m["repo"]) > 96:
        return None
    return m["repo"], m["revision"]


def resolve(spec: str | os.PathLike, *, token: str | bool | None = None) -> Source:
    """A local checkpoint folder, or a Hub repo id (``org/name[@revision]``) fetched into the Hub cache.

    A local path of the same name wins over the Hub. ``token`` is used for private or gated repos (default: the
    saved login or ``HF_TOKEN``).
    """
    path = Path(spec).expanduser()
    hub = None if isinstance(spec, Path) or lexists(path, "input") else parse_hub_spec(str(spec))
    if hub is None:
        return Source(path=path, label=str(spec), trusted_root=path)
    return _from_hub(str(spec), *hub, token=token)


def _from_hub(spec: str, repo_id: str, revision: str | None, *, token: str | bool | None) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                token=token,
                allow_patterns=HUB_ALLOW_PATTERNS,
                ignore_patterns=HUB_IGNORE_PATTERNS,
            )
        )
    except GatedRepoError:
        raise MergeError(
            f"{spec}: the Hub repo is gated; accept its terms on huggingface.co and log in "
            "(`hf auth login`) or pass --token"
        ) from None
    except RepositoryNotFoundError:
        raise MergeError(
            f"{spec}: no such local folder, and no Hub repo {repo_id} you can access; check the "
            "path, or log in (`hf auth login`) / pass --token for a private repo"
        ) from None
    except RevisionNotFoundError:
        raise MergeError(
            f"{spec}: the Hub repo {repo_id} has no revision {revision!r}; check the branch, tag or commit after '@'"
        ) from None
    except LocalEntryNotFoundError as e:
        offline = _offline()
        why = (
            "is not in the Hub cache (or only partly) and HF_HUB_OFFLINE=1 forbids downloading; unset "
            "HF_HUB_OFFLINE or download it first"
            if offline
            else f"could not be downloaded and is not in the Hub cache ({first_line(e, typed=True)}); check the network"
        )
        raise MergeError(f"{spec}: no such local folder, and the Hub repo {why}") from None
    except ValueError as e:  # HFValidationError: not a repo id after all
        raise MergeError(
            f"{spec}: no such local folder, and not a valid Hub repo id ({first_line(e, typed=True)})"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise MergeError(
            f"{spec}: download from the Hub failed ({first_line(e, typed=True)}); check the network and "
            "rerun (finished files stay in the Hub cache)"
        ) from None
    # snapshots/<commit>/<file> links to ../../blobs/<hash>: the repo's cache folder is the trusted root.
    repo_cache = folder.parent.parent if folder.parent.name == "snapshots" else folder
    commit = folder.name if folder.parent.name == "snapshots" else None
    return Source(path=folder, label=spec, trusted_root=repo_cache, hub_id=repo_id, revision=revision, commit=commit)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
