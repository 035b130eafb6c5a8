"""Prompt sources (JSONL file, folder of JSONL files, datasets folder, Hub dataset) and the per-round split."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from apo_trainer.errors import ConfigError


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
    if not files:
        raise ConfigError(
            f"config: prompts folder {path} holds no *.jsonl files (nor a datasets save_to_disk folder)", exit_code=1
        )
    return files


def _is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def _read_jsonl(path: Path, prompt_field: str, limit: int | None = None) -> list[str]:
    try:
        return _read_jsonl_lines(path, prompt_field, limit)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} of a line); save it as UTF-8", exit_code=1) from None


def _read_jsonl_lines(path: Path, prompt_field: str, limit: int | None) -> list[str]:
    out: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(
                    f"{path}:{lineno}: not a JSON object; prompts files hold one object per line", exit_code=1
                ) from None
            if not isinstance(obj, dict) or not isinstance(obj.get(prompt_field), str):
                raise ConfigError(
                    f"{path}:{lineno}: no string field '{prompt_field}'; set prompt_field to the "
                    "field that holds the prompt",
                    exit_code=1,
                )
            out.append(obj[prompt_field])
            if limit is not None and len(out) >= limit:
                break
    return out


def _read_datasets_folder(path: Path, prompt_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"config: {path} is a datasets folder; install `datasets` or export the prompts as JSONL", exit_code=1
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if prompt_field not in ds.column_names:
        raise ConfigError(f"{path}: no column '{prompt_field}' (columns: {', '.join(ds.column_names)})", exit_code=1)
    return [prompt_text(v, f"{path} row {i}", prompt_field) for i, v in enumerate(ds[prompt_field])]


_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# A name ending like a data file is a path that does not exist yet, not a Hub dataset id (data/prompts.jsonl).
FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet", ".arrow", ".tsv", ".gz", ".zst")


def is_hub_dataset(spec: str) -> bool:
    """``org/name`` that is not a local path and does not end like a data file: a dataset on the Hub (or in the
    offline cache)."""
    if spec.lower().endswith(FILE_SUFFIXES):
        return False
    return bool(_HUB_DATASET.match(spec)) and not Path(spec).exists()


def require_datasets(spec: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"config: prompts '{spec}' is a Hub dataset, which needs the datasets package; pip install "
            "'apo-merge[data]' (or give a JSONL file)",
            exit_code=1,
        ) from None
    return datasets


def prompt_text(value: Any, where: str, prompt_field: str) -> str:
    """A row's prompt: a string as it is; a chat (a list of {role, content} messages) gives its last user turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    raise ConfigError(
        f"{where}: field '{prompt_field}' is neither a string nor a chat with a user turn; set prompt_field to "
        "the field that holds the prompt",
        exit_code=1,
    )


def _read_hub_dataset(spec: str, prompt_field: str, split: str, revision: str) -> list[str]:
    datasets = require_datasets(spec)
    try:
        ds = datasets.load_dataset(spec, split=split, revision=revision or None)
    except Exception as e:  # datasets raises many types (not found, offline, bad split); one line for each
        text = " ".join(str(e).split())
        text = text if len(text) <= 200 else text[:197] + "..."
        raise ConfigError(
            f"config: cannot load Hub dataset '{spec}' split '{split}' ({type(e).__name__}: {text}); check the "
            "name, prompts_split and prompts_revision",
            exit_code=1,
        ) from None
    if prompt_field not in ds.column_names:
        raise ConfigError(
            f"config: Hub dataset '{spec}' has no column '{prompt_field}' (columns: {', '.join(ds.column_names)}); "
            "set prompt_field",
            exit_code=1,
        )
    return [prompt_text(v, f"{spec} row {i}", prompt_field) for i, v in enumerate(ds[prompt_field])]


def peek_prompt_source(path: Path, prompt_field: str) -> None:
    """Cheap check that ``path`` is a readable prompt source whose first record has ``prompt_field``."""
    if _is_datasets_folder(path):
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"config: {path} is a datasets folder; install `datasets` or export the prompts as JSONL", exit_code=1
            ) from None
        return
    first = _jsonl_files(path)[0]
    if not _read_jsonl(first, prompt_field, limit=1):
        raise ConfigError(f"config: prompts file {first} is empty", exit_code=1)


def load_prompts(
    path: str | Path, prompt_field: str = "prompt", *, split: str = "train", revision: str = ""
) -> list[str]:
    """Every prompt of the source, in file order (folders: files sorted by name; Hub datasets: ``split`` at
    ``revision``)."""
    if isinstance(path, str) and is_hub_dataset(path):
        return _read_hub_dataset(path, prompt_field, split, revision)
    p = Path(path)
    if _is_datasets_folder(p):
        return _read_datasets_folder(p, prompt_field)
    prompts: list[str] = []
    for f in _jsonl_files(p):
        prompts.extend(_read_jsonl(f, prompt_field))
    if not prompts:
        raise ConfigError(f"config: no prompts in {p}", exit_code=1)
    return prompts


def split_prompts(config) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) of a config: ``eval_prompts`` when set, else an ``eval_fraction`` of
    the prompt set (rounded, at least one) chosen by a fixed shuffle (the same for every seed, so runs on one
    prompt file share it)."""
    prompts = load_prompts(
        config.prompts, config.prompt_field, split=config.prompts_split, revision=config.prompts_revision
    )
    if config.eval_prompts:
        return prompts, load_prompts(config.eval_prompts, config.prompt_field)
    if config.eval_fraction <= 0:
        return prompts, []
    n = len(prompts)
    held = max(1, round(config.eval_fraction * n))
    if held >= n:
        raise ConfigError(
            f"config: eval_fraction {config.eval_fraction} of {n} prompts holds out {held}; it must leave at least "
            "one prompt on each side: set eval_fraction: 0 or give more prompts",
        )
    order = list(range(n))
    random.Random("apo-eval-split").shuffle(order)
    out = set(order[:held])
    return [p for i, p in enumerate(prompts) if i not in out], [p for i, p in enumerate(prompts) if i in out]


def round_prompts(
    prompts: list[str], round_index: int, per_round: int, *, seed: int, shuffle: bool = True
) -> tuple[list[int], bool]:
    """Indices into ``prompts`` for round ``round_index`` and whether any prompt is reused from an earlier round.

    ``per_round == 0`` gives every prompt every round. Otherwise the rounds walk an endless stream of passes over the
    set (each pass a permutation seeded by (seed, pass) when ``shuffle``), round t taking items
    [t * per_round, (t + 1) * per_round): fresh prompts each round until the set is exhausted, as the paper splits
    its prompt set into one part per round.
    """
    n = len(prompts)
    if per_round == 0:
        return list(range(n)), round_index > 0
    start, stop = round_index * per_round, (round_index + 1) * per_round
    out: list[int] = []
    for pos in range(start, stop):
        epoch, i = divmod(pos, n)
        out.append(_permutation(n, seed, epoch, shuffle)[i])
    return out, stop > n


_PERM_CACHE: dict[tuple[int, int, int, bool], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    key = (n, seed, epoch, shuffle)
    if key not in _PERM_CACHE:
        order = list(range(n))
        if shuffle:
            random.Random(f"apo-prompts:{seed}:{epoch}").shuffle(order)
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = order
    return _PERM_CACHE[key]
