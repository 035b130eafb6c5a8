"""The command-line shell of both tools (apo_merge.shell.run_cli): one line per failure and one exit code each,
usage errors from the option parser, stdout that cannot be written, long values, the verify/push routing, the
Ctrl-C exit code, and docs/errors.md against the code."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apo_merge import cli
from apo_merge.api import run_merge
from apo_merge.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, MergeError, UserError
from apo_merge.options import MergeOptions
from apo_merge.shell import MAX_MESSAGE_CHARS, MAX_VALUE_CHARS, Terminated, one_line
from apo_merge.verify import verify_output
from apo_trainer import cli as train_cli
from apo_trainer.errors import ConfigError, TrainError
from tests import errortable
from tests.checkpoints import make_checkpoint
from tests.merge.helpers import REPO, apo_merge_cmd, cli_env, run_main, st_tensors


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-pair")
    return make_checkpoint(root / "prev", seed=0), make_checkpoint(root / "cur", seed=1)


def merge(*args):
    return run_main(cli.main, *args)


def train(*args):
    return run_main(train_cli.main, *args)


def _one_line(res, code: int, prefix: str = "apo-merge") -> str:
    assert res.code == code, (res.code, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


# -- one class, one shell ------------------------------------------------------------------------------------------
def test_every_error_class_is_a_user_error_with_its_code():
    assert issubclass(MergeError, UserError) and issubclass(TrainError, UserError)
    assert issubclass(ConfigError, TrainError)
    assert MergeError("x").exit_code == EXIT_FAILURE and TrainError("x").exit_code == EXIT_FAILURE
    assert ConfigError("x").exit_code == EXIT_USAGE and ConfigError("x", exit_code=1).exit_code == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["a", "b", "--alpha", "0.3abc"], "'--alpha'"),
        (["a", "b", "--alpha", "0.3", "--dtype", "bf17"], "'bf17' is not one of"),
        (["a", "b", "--alpha", "0.3", "--bogus"], "No such option: --bogus"),
        (["a", "--alpha", "0.3"], "Missing argument 'CUR'"),
        (["a", "b"], "Missing option '--alpha'"),
        (["verify"], "Missing argument 'OUT'"),
        (["push", "x"], "Missing argument 'REPO_ID'"),
        (["verify", "x", "--bogus"], "No such option: --bogus"),
    ],
)
def test_parser_usage_errors_are_one_line_and_exit_2(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line(merge(*args), 2)
    assert needle in line and "--help" in line, line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run"], "Missing argument"),
        (["run", "c.yaml", "--bogus"], "No such option: --bogus"),
        (["nope"], "No such command"),
        (["demo", "--alphas", "0,x"], "not a comma-separated list of numbers"),
        (["demo", "--rounds", "zero"], "'--rounds'"),
    ],
)
def test_apo_train_usage_errors_are_one_line_and_exit_2(args, needle):
    line = _one_line(train(*args), 2, "apo-train")
    assert needle in line, line


def test_no_arguments_prints_the_help_and_exits_2():
    res = merge()
    assert res.code == 2 and "Usage: apo-merge" in res.stderr and "--alpha" in res.stderr


def test_help_and_version_exit_0():
    res = merge("--help")
    assert res.code == 0 and "a file or folder of that" in res.stdout.replace("\n", " ").replace("  ", " ")
    assert merge("--version").code == 0 and train("--version").code == 0


def test_in_process_runs_give_the_signal_handlers_back(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    merge("verify", tmp_path / "none")
    train("run", tmp_path / "none.yaml")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# -- exit codes: 2 for the command line, 1 for the world -----------------------------------------------------------
def test_output_state_errors_exit_1_and_command_line_errors_exit_2(pair, tmp_path):
    prev, cur = pair
    exists = tmp_path / "exists"
    exists.mkdir()
    assert "already exists" in _one_line(merge(prev, cur, "--alpha", "0.3", "-o", exists), 1)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "no such folder for the output" in _one_line(merge(prev, cur, "--alpha", "0.3", "-o", a_file / "out"), 1)
    assert "is inside input" in _one_line(merge(prev, cur, "--alpha", "0.3", "-o", cur / "x"), 2)
    assert "finite" in _one_line(merge(prev, cur, "--alpha", "nan", "-o", tmp_path / "o"), 2)
    assert "--push-to-hub" in _one_line(merge(prev, cur, "--alpha", "0.3", "--private"), 2)
    line = _one_line(merge(prev, cur, "--alpha", "0.3", "-o", tmp_path / "o", "--max-shard-size", "5XB"), 2)
    assert "is not a size" in line
    assert not (tmp_path / "o").exists()


def test_an_unanticipated_os_error_is_one_line(monkeypatch, tmp_path):
    import apo_merge.verify

    def denied(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(apo_merge.verify, "verify_output", denied)
    assert _one_line(merge("verify", tmp_path), 1) == f"apo-merge: error: Permission denied: {tmp_path}"
    monkeypatch.setenv("APO_DEBUG", "1")
    with pytest.raises(PermissionError):
        merge("verify", tmp_path)


@pytest.mark.parametrize("exc, code, word", [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated")])
def test_apo_train_run_interrupted_says_how_to_resume(monkeypatch, tmp_path, exc, code, word):
    import apo_trainer.config
    import apo_trainer.loop

    class Cfg:
        def validate(self):
            pass

    def stop(*a, **k):
        raise exc()

    monkeypatch.setattr(apo_trainer.config.APOConfig, "from_yaml", classmethod(lambda cls, *a: Cfg()))
    monkeypatch.setattr(apo_trainer.loop, "run", stop)
    line = _one_line(train("run", tmp_path / "c.yaml"), code, "apo-train")
    assert line == f"apo-train: error: {word}; rerun the same command to resume"


# -- verify / push never shadow a PREV folder of that name ---------------------------------------------------------
def test_a_prev_folder_named_verify_is_merged_not_verified(pair, tmp_path, monkeypatch):
    prev, cur = pair
    monkeypatch.chdir(tmp_path)
    (tmp_path / "verify").symlink_to(prev, target_is_directory=True)
    res = merge("verify", cur, "--alpha", "0.3", "-o", tmp_path / "out", "--device", "cpu")
    assert res.code == 0 and "tensors" in res.stdout, res.stderr
    verify_output(tmp_path / "out")
    (tmp_path / "verify").unlink()
    res = merge("verify", tmp_path / "out")  # no such folder any more: the command
    assert res.code == 0 and "OK" in res.stdout, res.stderr
    (tmp_path / "push").write_text("a file named push")
    line = _one_line(merge("push", cur, "--alpha", "0.3", "-o", tmp_path / "o2"), 1)  # PREV 'push', not a folder
    assert "push" in line


# -- stdout that cannot be written --------------------------------------------------------------------------------
def _subprocess(args, stdout) -> subprocess.CompletedProcess:
    return subprocess.run(
        apo_merge_cmd(*args), cwd=REPO, env=cli_env(), stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_device_exits_1_saying_out_is_complete(pair, tmp_path):
    prev, cur = pair
    out = tmp_path / "out"
    with open("/dev/full", "w") as full:
        p = _subprocess([prev, cur, "--alpha", "0.3", "-o", out, "--device", "cpu"], full)
    lines = p.stderr.splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "cannot write the result to stdout (No space left on device)" in lines[0]
    assert f"{out} is complete" in lines[0]
    verify_output(out)
    with open("/dev/full", "w") as full:
        p = _subprocess(["verify", out], full)
    assert p.returncode == 1 and f"{out} passed verification" in p.stderr and len(p.stderr.splitlines()) == 1


def test_stdout_closed_by_its_reader_is_one_line_not_a_silent_exit_1(pair, tmp_path):
    prev, cur = pair
    out = tmp_path / "out"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (`| head -c0`)
    try:
        p = _subprocess([prev, cur, "--alpha", "0.3", "-o", out, "--device", "cpu"], write)
    finally:
        os.close(write)
    lines = p.stderr.splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "stdout was closed by its reader (broken pipe)" in lines[0] and f"{out} is complete" in lines[0]
    verify_output(out)


# -- long values ------------------------------------------------------------------------------------------------
def test_one_line_caps_each_value_and_the_line():
    name = "layers." + "x" * 50_000 + ".weight"
    line = one_line(f"only in CUR: {name}, {name}; use --on-missing copy\nnext")
    assert len(line) < 3 * MAX_VALUE_CHARS and "…" in line and "\\n" in line
    assert line.startswith("only in CUR: layers.xxx") and line.endswith("copy\\nnext")
    assert len(one_line(" ".join(["y" * 150] * 1000))) == MAX_MESSAGE_CHARS
    assert one_line("short message kept as is") == "short message kept as is"


def _one_tensor_folder(folder: Path, names: list[str]) -> Path:
    folder.mkdir()
    data = torch.ones(2).numpy().tobytes()
    (folder / "model.safetensors").write_bytes(st_tensors({n: ("F32", [2], data) for n in names}))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder


def test_fifty_thousand_character_tensor_names_make_a_short_line(tmp_path):
    long = ["w" * 50_000 + f".{i}" for i in range(20)]
    prev = _one_tensor_folder(tmp_path / "prev", ["a", *long[:10]])
    cur = _one_tensor_folder(tmp_path / "cur", ["a", *long[10:]])
    line = _one_line(merge(prev, cur, "--alpha", "0.3", "-o", tmp_path / "out", "--device", "cpu"), 1)
    assert (
        "only in" in line
        and ("…" in line or "..." in line)
        and len(line) <= len("apo-merge: error: ") + MAX_MESSAGE_CHARS
    )


# -- Ctrl-C: the exit code, never a death by SIGINT ------------------------------------------------------------------
_CAUGHT = """
import sys
import typer
from apo_merge.errors import UserError
from apo_merge.shell import run_cli, shell_command

app = typer.Typer()

@app.command(cls=shell_command("t"))
def main(fail: bool = False) -> None:
    try:
        exec("raise KeyboardInterrupt")  # as when Ctrl-C lands in a dataclass being built during an import
    except KeyboardInterrupt:
        if fail:
            raise UserError("interrupted; nothing was left", 130) from None
    print("done")

run_cli("t", app)
"""


@pytest.mark.parametrize("args, code", [([], 0), (["--fail"], 130)])
def test_a_caught_interrupt_never_turns_into_a_death_by_sigint(tmp_path, args, code):
    """CPython marks an interrupt that ended an exec() of a string as unhandled even when it was caught, and kills
    itself with SIGINT at exit; this was the flaky test_interrupt_while_writing[SIGINT] (returncode -2)."""
    (tmp_path / "caught_interrupt.py").write_text(_CAUGHT)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    p = subprocess.run([sys.executable, "-m", "caught_interrupt", *args], env=env, capture_output=True, text=True)
    assert p.returncode == code, (p.returncode, p.stderr)


# -- docs/errors.md is the code's list ------------------------------------------------------------------------------
@pytest.mark.slow
def test_errors_doc_lists_every_error_with_its_code():
    head, generated = errortable.documented()
    assert generated == errortable.table(), (
        "docs/errors.md differs from the errors in the code; run `python -m tests.errortable --write` and review"
    )
    codes = {int(c) for c in re.findall(r"^\| (\d+) \|", head, flags=re.M)}
    assert codes == {0, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED}
    assert {code for code, _, _ in errortable.rows()} <= codes
    assert len(errortable.rows()) > 100  # the scan found the errors (a broken scan would find none)


def test_an_error_a_signal_tore_is_reported_as_the_interruption(monkeypatch):
    """A Ctrl-C inside `import torch` can surface as an ImportError: once a signal arrived, such an ending is the
    interruption (exit 130 with its message), never a traceback; a UserError keeps its own message."""
    from apo_merge import shell

    monkeypatch.setattr(shell, "_received", [signal.SIGINT])
    assert isinstance(shell.interruption(ImportError("cannot load module more than once")), KeyboardInterrupt)
    assert shell.interruption(MergeError("x")) is None
    monkeypatch.setattr(shell, "_received", [signal.SIGTERM])
    assert isinstance(shell.interruption(ImportError("x")), Terminated)
    monkeypatch.setattr(shell, "_received", [])
    assert shell.interruption(ImportError("x")) is None


# -- paths compared as the folders they are; alphas that are numbers the merge can hold ----------------------------
@pytest.mark.parametrize("layout", ["dotdot", "symlinks"])
def test_outputs_that_resolve_to_one_folder_are_refused_before_any_read(pair, tmp_path, monkeypatch, layout):
    """-o 'x{alpha}/../o' (or parents that are symlinks to one folder) named one folder for two alphas: the second
    output silently replaced the first, exit 0. Refused before anything is read or written, naming both alphas."""
    monkeypatch.chdir(tmp_path)
    real = tmp_path / "real"
    real.mkdir()
    for a in ("0.1", "0.3"):
        if layout == "dotdot":
            (tmp_path / f"x{a}").mkdir()
        else:
            (tmp_path / f"x{a}").symlink_to(real, target_is_directory=True)
    target = "x{alpha}/../o" if layout == "dotdot" else "x{alpha}/o"
    line = _one_line(merge(*pair, "--alpha", "0.1,0.3", "-o", target, "--overwrite", "--device", "cpu"), 2)
    assert "0.1" in line and "0.3" in line and "{alpha}" in line, line
    assert not (tmp_path / "o").exists() and not any(real.iterdir())


@pytest.mark.parametrize(
    "alpha, needle",
    [
        ("1e-400", "'--alpha': 1e-400 is too small to represent"),  # below every double: float() gives 0
        ("0.3,-1e-400", "'--alpha': -1e-400 is too small to represent"),
        ("1e-46", "--alpha 1e-46 is too small to represent"),  # 0 in float32, the merge's arithmetic
        ("1e39", "--alpha 1e+39 overflows float32"),  # finite as a double, inf in float32
        ("-3.5e38", "--alpha -3.5e+38 overflows float32"),
    ],
)
def test_alphas_the_merge_cannot_represent_are_usage_errors(pair, tmp_path, alpha, needle):
    line = _one_line(merge(*pair, "--alpha", alpha, "-o", tmp_path / "o{alpha}", "--device", "cpu"), 2)
    assert needle in line, line
    assert not list(tmp_path.iterdir())
    with pytest.raises(MergeError, match="overflows float32|too small") as e:
        MergeOptions(float(alpha.split(",")[-1]) or 1e-46)
    assert e.value.exit_code == 2
    assert MergeOptions(1e-45).alpha == 1e-45 and MergeOptions(-3.4e38).alpha == -3.4e38  # the edges still merge


def test_an_output_name_with_a_non_utf8_byte(pair, tmp_path):
    """An -o holding a byte that is not UTF-8 (argv decodes it to a lone surrogate): a traceback
    (UnicodeEncodeError) before; now one line, exit 2, nothing written, from the CLI and the API alike."""
    name = os.fsdecode(b"out\xff")
    res = subprocess.run(
        apo_merge_cmd(*pair, "--alpha", "0.3", "-o", tmp_path / name, "--device", "cpu"),
        capture_output=True,
        env=cli_env(),
        timeout=120,
    )
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "UTF-8" in err and "\\udcff" in err or "\\xff" in err, err
    assert not list(tmp_path.iterdir())
    with pytest.raises(MergeError, match="UTF-8") as e:
        run_merge(*pair, MergeOptions(0.3, device="cpu"), tmp_path / name)
    assert e.value.exit_code == 2 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("quiet", [False, True])
def test_apo_train_quiet_silences_the_loading_bars(monkeypatch, tmp_path, pair, quiet):
    """`apo-train run -q` printed transformers' "Loading weights" bars: -q now turns off transformers' and
    huggingface_hub's progress bars and advice too (and gives them back after the command)."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from huggingface_hub.utils import tqdm as hub_tqdm
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import apo_trainer.config
    import apo_trainer.loop

    class Cfg:
        def validate(self):
            pass

    def run(cfg, **kwargs):
        AutoModelForCausalLM.from_pretrained(pair[1])
        for _ in hub_tqdm(range(2), desc="hub download"):
            pass

    monkeypatch.setattr(apo_trainer.config.APOConfig, "from_yaml", classmethod(lambda cls, *a: Cfg()))
    monkeypatch.setattr(apo_trainer.loop, "run", run)
    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    res = train("run", tmp_path / "c.yaml", *(["-q"] if quiet else []))
    assert res.code == 0, res.stderr
    shown = "Loading weights" in res.stderr, "hub download" in res.stderr
    assert shown == ((False, False) if quiet else (True, True)), res.stderr
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()) == before


def test_the_progress_bar_path_writes_the_same_output(pair, tmp_path, monkeypatch):
    """On a terminal the merge runs under a rich progress bar (the path tests otherwise never take)."""
    from rich.console import Console

    prev, cur = pair
    expected = run_merge(prev, cur, MergeOptions(0.3), tmp_path / "api").output
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    res = merge(prev, cur, "--alpha", "0.3", "-o", tmp_path / "bar")
    assert res.code == 0, res.stderr
    for f in expected.glob("*.safetensors"):
        assert (tmp_path / "bar" / f.name).read_bytes() == f.read_bytes()
