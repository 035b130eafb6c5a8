"""Prompt sources (JSONL file, folder of JSONL files, datasets folder) and the fresh-prompts-per-round split."""

from __future__ import annotations

import json
import random
from pathlib import Path

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
    return [str(x) for x in ds[prompt_field]]


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


def load_prompts(path: str | Path, prompt_field: str = "prompt") -> list[str]:
    """Every prompt of the source, in file order (folders: files sorted by name)."""
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
    the prompt set chosen by a fixed shuffle (the same for every seed, so runs on one prompt file share it)."""
    prompts = load_prompts(config.prompts, config.prompt_field)
    if config.eval_prompts:
        return prompts, load_prompts(config.eval_prompts, config.prompt_field)
    if config.eval_fraction <= 0:
        return prompts, []
    n = len(prompts)
    held = round(config.eval_fraction * n)
    if held < 1 or held >= n:
        raise ConfigError(
            f"config: eval_fraction {config.eval_fraction} of {n} prompts holds out {held}; it must leave at least "
            "one prompt on each side",
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
