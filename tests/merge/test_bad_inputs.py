"""Hostile and broken inputs through the real CLI: each fails with exit 1 or 2 and one stderr line naming the
file and the cause, prints no traceback, leaves no OUT and no temporary folder, and changes no input byte."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.merge.helpers import (
    assert_one_line_error,
    leftovers,
    run_cli,
    run_cli_in_process,
    st_bytes,
    st_tensors,
    tree_state,
)

SHARD1 = "model-00001-of-00003.safetensors"
INDEX = "model.safetensors.index.json"
F32_2 = b"\0" * 8  # two float32 zeros


@dataclass
class Work:
    root: Path  # everything a case builds lives here, and is hashed before and after the run
    prev: Path
    cur: Path
    out: Path
    alpha: str = "0.3"
    extra: list[str] = field(default_factory=list)  # more options on the command line

    @property
    def args(self) -> list[str]:
        return [
            str(self.prev),
            str(self.cur),
            "--alpha",
            self.alpha,
            "-o",
            str(self.out),
            "--device",
            "cpu",
            "-q",
            *self.extra,
        ]

    @property
    def cur_file(self) -> Path:
        return self.cur / "model.safetensors"

    def edit_index(self, edit: Callable[[dict], object]) -> Path:
        path = self.cur / INDEX
        index = json.loads(path.read_text())
        edit(index)
        path.write_text(json.dumps(index))
        return path


@dataclass
class Case:
    id: str
    build: Callable[[Work], tuple[int, list[str]]]  # -> expected exit code, substrings of the message
    layout: str  # "single" or "shard": which tiny checkpoints PREV and CUR start as
    in_subprocess: bool


CASES: list[Case] = []


def case(layout: str = "single", in_subprocess: bool = False):
    def register(fn: Callable[[Work], tuple[int, list[str]]]):
        CASES.append(Case(fn.__name__, fn, layout, in_subprocess))
        return fn

    return register


# -- the safetensors file itself ---------------------------------------------------------------------------------
@case(in_subprocess=True)
def file_shorter_than_8_bytes(w):
    w.cur_file.write_bytes(b"\x01\x02\x03")
    return 1, [str(w.cur_file), "3 bytes is too short"]


@case()
def zero_byte_file(w):
    w.cur_file.write_bytes(b"")
    return 1, [str(w.cur_file), "0 bytes is too short"]


@case()
def header_length_beyond_file(w):
    w.cur_file.write_bytes(st_bytes(b"{}", length=4096))
    return 1, [str(w.cur_file), "header length 4096 runs past the end"]


@case()
def header_over_100_mb(w):
    w.cur_file.write_bytes(st_bytes(b"{}", length=200_000_000))
    return 1, [str(w.cur_file), "exceeds the 100000000-byte limit"]


@case(in_subprocess=True)
def header_not_json(w):
    w.cur_file.write_bytes(st_bytes(b"{this is not json}"))
    return 1, [str(w.cur_file), "not valid JSON"]


@case()
def header_json_but_not_object(w):
    w.cur_file.write_bytes(st_bytes(b"[1, 2, 3]"))
    return 1, [str(w.cur_file), "not a JSON object"]


@case()
def header_not_utf8(w):
    w.cur_file.write_bytes(st_bytes(b'{"w\xff\xfe": 1}'))
    return 1, [str(w.cur_file), "not UTF-8"]


@case()
def header_nested_too_deeply(w):
    w.cur_file.write_bytes(st_bytes(b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    return 1, [str(w.cur_file), "nested too deeply"]


@case()
def unknown_dtype(w):
    w.cur_file.write_bytes(st_bytes({"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, b"\0" * 32))
    return 1, [str(w.cur_file), "unknown dtype 'F128'"]


@case()
def negative_shape(w):
    w.cur_file.write_bytes(st_bytes({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, F32_2))
    return 1, [str(w.cur_file), "invalid shape [-2]"]


@case()
def non_integer_shape(w):
    w.cur_file.write_bytes(st_bytes({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, F32_2))
    return 1, [str(w.cur_file), "invalid shape [2.0]"]


@case()
def shape_times_dtype_differs_from_byte_range(w):
    w.cur_file.write_bytes(st_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, F32_2))
    return 1, [str(w.cur_file), "is 12 bytes but its byte range holds 8"]


@case()
def data_offsets_overlap(w):
    w.cur_file.write_bytes(
        st_bytes(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        )
    )
    return 1, [str(w.cur_file), "overlap"]


@case()
def data_offsets_with_hole(w):
    w.cur_file.write_bytes(
        st_bytes(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
            },
            b"\0" * 20,
        )
    )
    return 1, [str(w.cur_file), "hole"]


@case()
def data_offsets_out_of_order(w):
    w.cur_file.write_bytes(st_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, F32_2))
    return 1, [str(w.cur_file), "invalid data_offsets [8, 0]"]


@case()
def data_offsets_past_the_end(w):
    w.cur_file.write_bytes(st_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32_2))
    return 1, [str(w.cur_file), "truncated file"]


@case()
def data_offsets_not_covering_the_data(w):
    w.cur_file.write_bytes(st_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 24))
    return 1, [str(w.cur_file), "trailing bytes"]


@case()
def real_checkpoint_truncated(w):
    raw = w.cur_file.read_bytes()
    w.cur_file.write_bytes(raw[:-100])
    return 1, [str(w.cur_file), "truncated file"]


@case()
def duplicate_tensor_names(w):
    entry = b'{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    w.cur_file.write_bytes(st_bytes(b'{"w": ' + entry + b', "w": ' + entry + b"}", F32_2))
    return 1, [str(w.cur_file), "duplicate key 'w'"]


@case()
def metadata_with_non_string_value(w):
    w.cur_file.write_bytes(
        st_bytes(
            {"__metadata__": {"format": "pt", "step": 3}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            F32_2,
        )
    )
    return 1, [str(w.cur_file), "__metadata__ must map strings to strings"]


@case()
def tensor_entry_with_extra_key(w):
    w.cur_file.write_bytes(st_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, F32_2))
    return 1, [str(w.cur_file), "exactly the keys dtype, shape, data_offsets"]


@case()
def tensor_name_with_lone_surrogate(w):
    w.cur_file.write_bytes(st_bytes(b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', F32_2))
    return 1, [str(w.cur_file), "not valid Unicode"]


@case(in_subprocess=True)  # a regression would block in open(); the subprocess timeout turns that into a failure
def weight_file_is_a_fifo(w):
    w.cur_file.unlink()
    os.mkfifo(w.cur_file)
    return 1, [str(w.cur_file), "not a regular file"]


@case()
def weight_file_is_a_folder(w):
    w.cur_file.unlink()
    w.cur_file.mkdir()
    return 1, [str(w.cur_file), "cannot read (Is a directory)"]


@case(in_subprocess=True)
def weight_file_symlink_leading_outside(w):
    outside = w.root / "outside"
    outside.mkdir()
    w.cur_file.rename(outside / "model.safetensors")
    w.cur_file.symlink_to(outside / "model.safetensors")
    return 1, [str(w.cur_file), "symlink leading outside the checkpoint folder"]


# -- the index of a sharded checkpoint ---------------------------------------------------------------------------
@case("shard", in_subprocess=True)
def index_not_json(w):
    (w.cur / INDEX).write_text('{"weight_map": ')
    return 1, [str(w.cur / INDEX), "not a readable JSON index"]


@case("shard")
def index_nested_too_deeply(w):
    (w.cur / INDEX).write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return 1, [str(w.cur / INDEX), "nested too deeply"]


@case("shard", in_subprocess=True)  # a regression blocks in open(): the subprocess timeout fails the test
def index_is_a_fifo(w):
    (w.cur / INDEX).unlink()
    os.mkfifo(w.cur / INDEX)
    return 1, [str(w.cur / INDEX), "not a regular file"]


@case(in_subprocess=True)
def overwrite_where_out_has_a_fifo_readme(w):
    w.out.mkdir()
    (w.out / "weights.txt").write_text("mine")
    os.mkfifo(w.out / "README.md")
    w.extra = ["--overwrite"]
    return 1, [str(w.out), "is not an apo-merge output"]


@case(in_subprocess=True)
def adapter_config_is_a_fifo(w):
    _lora_pair(w, LAYER, LAYER)
    (w.cur / "adapter_config.json").unlink()
    os.mkfifo(w.cur / "adapter_config.json")
    return 1, [str(w.cur / "adapter_config.json"), "not a regular file"]


@case(in_subprocess=True)
def adapter_weights_are_a_fifo(w):
    _lora_pair(w, LAYER, LAYER)
    (w.cur / "adapter_model.safetensors").unlink()
    os.mkfifo(w.cur / "adapter_model.safetensors")
    return 1, [str(w.cur), "no adapter_model.safetensors"]


@case("shard")
def index_without_weight_map(w):
    index = w.edit_index(lambda ix: ix.pop("weight_map"))
    return 1, [str(index), "has no weight_map object"]


@case("shard")
def index_weight_map_not_an_object(w):
    index = w.edit_index(lambda ix: ix.update(weight_map=[SHARD1]))
    return 1, [str(index), "has no weight_map object"]


@case("shard")
def index_names_a_missing_shard(w):
    (w.cur / SHARD1).unlink()
    return 1, [str(w.cur / INDEX), f"names shard '{SHARD1}', which is missing"]


@case("shard")
def index_names_a_tensor_its_shard_lacks(w):
    index = w.edit_index(lambda ix: ix["weight_map"].update({"ghost.weight": SHARD1}))
    return 1, [str(index), f"maps 'ghost.weight' to {SHARD1}, which has no such tensor"]


@case("shard")
def shard_holds_a_tensor_the_index_omits(w):
    index = json.loads((w.cur / INDEX).read_text())
    name = next(n for n, s in index["weight_map"].items() if s == SHARD1)
    w.edit_index(lambda ix: ix["weight_map"].pop(name))
    return 1, [str(w.cur / SHARD1), f"holds tensor '{name}' that the index does not map"]


@case("shard", in_subprocess=True)
def index_shard_path_with_dotdot(w):
    target = f"../{w.prev.name}/{SHARD1}"
    index = w.edit_index(
        lambda ix: ix["weight_map"].update({k: target for k, v in ix["weight_map"].items() if v == SHARD1})
    )
    return 1, [str(index), repr(target), "path traversal refused"]


@case("shard")
def index_shard_absolute_path(w):
    target = str(w.prev / SHARD1)
    index = w.edit_index(
        lambda ix: ix["weight_map"].update({k: target for k, v in ix["weight_map"].items() if v == SHARD1})
    )
    return 1, [str(index), "path traversal refused"]


@case("shard")
def index_shard_name_with_nul(w):
    index = w.edit_index(
        lambda ix: ix["weight_map"].update({k: "a\0b.safetensors" for k, v in ix["weight_map"].items() if v == SHARD1})
    )
    return 1, [str(index), "path traversal refused"]


@case("shard")
def index_shard_name_with_lone_surrogate(w):
    index = w.edit_index(
        lambda ix: ix["weight_map"].update(
            {k: "\ud800.safetensors" for k, v in ix["weight_map"].items() if v == SHARD1}
        )
    )
    return 1, [str(index), "path traversal refused"]


@case("shard")
def shard_named_readme_md(w):
    (w.cur / SHARD1).rename(w.cur / "README.md")  # the model card would overwrite it
    w.edit_index(
        lambda ix: ix["weight_map"].update({k: "README.md" for k, v in ix["weight_map"].items() if v == SHARD1})
    )
    return 1, [str(w.cur / INDEX), "'README.md'", "--max-shard-size"]


@case("shard")
def shard_symlink_leading_outside(w):
    outside = w.root / "outside"
    outside.mkdir()
    (w.cur / SHARD1).rename(outside / SHARD1)
    (w.cur / SHARD1).symlink_to(outside / SHARD1)
    return 1, [str(w.cur / SHARD1), "symlink leading outside the checkpoint folder"]


# -- the folders -------------------------------------------------------------------------------------------------
class _RunsCodeWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling would create this file: tree_state would show it


@case(in_subprocess=True)
def only_pickle_weights(w):
    w.cur_file.unlink()
    (w.cur / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(str(w.root / "unpickled"))))
    return 1, [str(w.cur), "only pickle weights (pytorch_model.bin)", "safe_serialization=True"]


@case()
def empty_folder(w):
    shutil.rmtree(w.cur)
    w.cur.mkdir()
    return 1, [str(w.cur), "holds no model.safetensors"]


@case()
def missing_folder(w):
    shutil.rmtree(w.cur)
    return 1, [str(w.cur), "no such folder"]


@case()
def input_is_a_file(w):
    shutil.rmtree(w.cur)
    w.cur.write_text("not a folder")
    return 1, [str(w.cur), "is not a folder"]


@case()
def several_weight_files_without_index(w):
    shutil.copy(w.cur_file, w.cur / "extra-a.safetensors")
    w.cur_file.rename(w.cur / "extra-b.safetensors")
    return 1, [str(w.cur), "several .safetensors files", "no model.safetensors.index.json"]


@case()
def side_file_symlink_leading_outside(w):
    (w.root / "secret.txt").write_text("not part of the checkpoint")
    (w.cur / "tokenizer.json").symlink_to(w.root / "secret.txt")
    return 1, [str(w.cur / "tokenizer.json"), "symlink leading outside the checkpoint folder"]


@case()
def output_inside_an_input(w):
    w.out = w.cur / "merged"
    return 2, [str(w.out), "is inside input", "choose an -o outside both inputs"]


@case()
def alpha_not_finite(w):
    w.alpha = "nan"
    return 2, ["--alpha nan is not a finite number"]


# -- two valid files that do not belong together ------------------------------------------------------------------
def _pair(w: Work, prev: dict, cur: dict) -> None:
    (w.prev / "model.safetensors").write_bytes(st_tensors(prev))
    w.cur_file.write_bytes(st_tensors(cur))


@case()
def shapes_differ(w):
    _pair(w, {"w": ("F32", [2, 2], b"\0" * 16)}, {"w": ("F32", [4], b"\0" * 16)})
    return 1, [f"shape mismatch between PREV ({w.prev}) and CUR ({w.cur})", "w [2, 2] vs [4]"]


@case()
def tensor_names_differ(w):
    _pair(w, {"a": ("F32", [2], F32_2)}, {"b": ("F32", [2], F32_2)})
    return 1, [f"PREV ({w.prev}) and CUR ({w.cur})", "only in CUR: b", "only in PREV: a", "--on-missing copy"]


@case()
def tensor_name_with_newline_stays_one_line(w):
    _pair(w, {"a": ("F32", [2], F32_2)}, {"bad\nname": ("F32", [2], F32_2)})
    return 1, ["only in CUR: bad\\nname"]


@case()
def integer_prev_float_cur(w):
    _pair(w, {"w": ("I32", [2], F32_2)}, {"w": ("F32", [2], F32_2)})
    return 1, [f"w (PREV {w.prev / 'model.safetensors'}, CUR {w.cur_file}): dtype I32 in PREV but F32 in CUR"]


@case()
def quantized_fp8_weights(w):
    _pair(w, {"w": ("F8_E4M3", [2], b"\0\0")}, {"w": ("F8_E4M3", [2], b"\0\0")})
    # issue 28: FP8 is read when config.json says how (block-scaled); without it, the config is what is missing
    return 1, ["holds F8 weights", "has no quantization_config", "config.json"]


@case()
def checkpoint_without_tensors(w):
    _pair(w, {}, {})
    return 1, [str(w.cur), "holds no tensors"]


# -- LoRA adapters (hand-built: a base with one [16, 16] weight "layer.weight") -------------------------------------
def f32(*shape: int, seed: int = 0) -> tuple[str, list[int], bytes]:
    import torch

    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return ("F32", list(shape), t.numpy().tobytes())


LORA_CONFIG = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["layer"],
    "base_model_name_or_path": "tiny/base",
}


def _adapter(folder: Path, tensors: dict, **config) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    full = {f"base_model.model.{k}": v for k, v in tensors.items()}
    (folder / "adapter_model.safetensors").write_bytes(st_tensors(full))
    (folder / "adapter_config.json").write_text(json.dumps({**LORA_CONFIG, **config}))
    return folder


def _lora_pair(w: Work, prev: dict, cur: dict, base_shape=(16, 16), **config) -> Path:
    """PREV and CUR become adapters; returns a base checkpoint folder (outside both) holding layer.weight."""
    _adapter(w.prev, prev, **config)
    _adapter(w.cur, cur, **config)
    base = w.root / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(st_tensors({"layer.weight": f32(*base_shape, seed=9)}))
    return base


LAYER = {"layer.lora_A.weight": f32(2, 16, seed=1), "layer.lora_B.weight": f32(16, 2, seed=2)}


@case()
def merge_into_update_broadcasts_over_the_base(w):
    one_row = {"layer.lora_A.weight": f32(2, 16, seed=1), "layer.lora_B.weight": f32(1, 2, seed=2)}
    w.extra = ["--merge-into", str(_lora_pair(w, one_row, one_row))]
    return 1, ["layer.weight", "[16, 16] in the base", "[1, 16]"]


@case()
def merge_into_update_of_another_shape(w):
    other = {"layer.lora_A.weight": f32(2, 8, seed=1), "layer.lora_B.weight": f32(3, 2, seed=2)}
    w.extra = ["--merge-into", str(_lora_pair(w, other, other))]
    return 1, ["layer.weight", "[16, 16] in the base", "[3, 8]"]


@case()
def lora_factor_shapes_differ_between_prev_and_cur(w):
    other = {"layer.lora_A.weight": f32(2, 8, seed=1), "layer.lora_B.weight": f32(16, 2, seed=2)}
    w.extra = ["--merge-into", str(_lora_pair(w, LAYER, other))]
    return 1, ["LoRA layer layer", "factor shapes differ between PREV and CUR"]


@case()
def merge_into_output_inside_base(w):
    base = _lora_pair(w, LAYER, LAYER)
    w.out = base / "x"
    w.extra = ["--merge-into", str(base)]
    return 2, [str(w.out), "is inside input", str(base)]


@case()
def merge_into_output_is_base_with_overwrite(w):
    base = _lora_pair(w, LAYER, LAYER)
    (base / "README.md").write_text("<!-- apo-merge -->\n")  # even an earlier apo-merge output, once it is an input
    w.out = base
    w.extra = ["--merge-into", str(base), "--overwrite"]
    return 2, [str(base), "is inside input"]


# -- one line for every failure (issue 15, section 2) ---------------------------------------------------------------
@case()
def cur_path_component_over_255_bytes(w):
    w.cur = w.root / ("c" * 300)
    return 1, ["longer than the file system allows", "ccc..."]


@case()
def output_path_component_over_255_bytes(w):
    w.out = w.root / ("o" * 300)
    return 2, ["longer than the file system allows", "ooo..."]


@case()
def max_shard_size_with_400_digits(w):
    w.extra = ["--max-shard-size", "9" * 400]
    return 2, ["--max-shard-size", "too large"]


@case()
def rank_zero_adapters(w):
    empty = {"layer.lora_A.weight": ("F32", [0, 16], b""), "layer.lora_B.weight": ("F32", [16, 0], b"")}
    _lora_pair(w, empty, empty, r=0)
    return 1, ["LoRA layer layer has rank 0"]


@case()
def rank_pattern_key_not_a_regex(w):
    _lora_pair(w, LAYER, LAYER, rank_pattern={"lay(er": 2})
    return 1, ["rank_pattern", "'lay(er'", "not a valid regular expression"]


@case()
def target_modules_mixing_numbers_and_strings(w):
    _lora_pair(w, LAYER, LAYER, target_modules=["layer", 3])
    return 1, ["target_modules", "strings"]


@case()
def adapter_config_nested_too_deeply(w):
    _lora_pair(w, LAYER, LAYER)
    (w.cur / "adapter_config.json").write_text('{"peft_type": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return 1, [str(w.cur / "adapter_config.json"), "nested too deeply"]


@case()
def long_tensor_names_are_shortened(w):
    prev = {f"{i}" + "p" * 50_000: ("F32", [2], F32_2) for i in range(20)}
    cur = {f"{i}" + "c" * 50_000: ("F32", [2], F32_2) for i in range(20)}
    _pair(w, prev, cur)
    return 1, ["tensor names differ", "cccc...", "and 10 more"]


@case()
def long_tensor_names_shortened_in_shape_mismatch(w):
    name = "w" * 50_000
    _pair(w, {name: ("F32", [2, 2], b"\0" * 16)}, {name: ("F32", [4], b"\0" * 16)})
    return 1, ["shape mismatch", "www...", "[2, 2] vs [4]"]


# -- the test ----------------------------------------------------------------------------------------------------
def _work(tmp_path: Path, tiny: dict[str, Path], layout: str) -> Work:
    prev, cur = tmp_path / "prev", tmp_path / "cur"
    shutil.copytree(tiny[f"{layout}_prev"], prev)
    shutil.copytree(tiny[f"{layout}_cur"], cur)
    return Work(tmp_path, prev, cur, tmp_path / "out")


def test_there_are_at_least_30_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_fails_cleanly(case: Case, tiny_checkpoints, tmp_path, keep_sigterm):
    w = _work(tmp_path, tiny_checkpoints, case.layout)
    code, needles = case.build(w)
    skip = None if os.path.lexists(w.out) else w.out  # an OUT that is an input must stay as it was
    before = tree_state(tmp_path, skip=skip)
    res = run_cli(*w.args, timeout=60) if case.in_subprocess else run_cli_in_process(*w.args)
    line = assert_one_line_error(res, code, *needles)
    assert len(line) < 2000, len(line)  # long names and values are shortened
    assert skip is None or not os.path.lexists(w.out)
    assert leftovers(w.out) == []
    assert tree_state(tmp_path, skip=skip) == before  # inputs unchanged, and nothing was unpickled
