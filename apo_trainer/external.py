"""The train phase run by another trainer: a command (``train_command``) or a Python function (``train_fn``).

apo-train keeps the loop (sample, judge, reference, pairs, extrapolate, eval, resume); the trainer turns theta_t and
the round's pairs into the raw theta_hat_{t+1}. Per round it writes the pairs in the formats trainers read
(``round-<t>/pairs-trl/train.jsonl``, ``round-<t>/pairs-openrlhf.jsonl``), clears ``round-<t>/external/`` (always
inside the run folder), runs the command with its output streamed to the console and ``round-<t>/train.log``,
then reads back what the trainer wrote there: a Hugging Face folder, the last ``checkpoint-N`` when the folder
holds no weights, a LoRA adapter (merged exactly into theta_t, as in ``peft:`` rounds) or a DCP folder, refusing
another architecture. The result is saved as ``round-<t>/trained`` and extrapolated raw vs raw as usual.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apo_merge.errors import first_line, shorten, shown
from apo_trainer.data import load_pairs, trainer_rows
from apo_trainer.errors import ConfigError, TrainError
from apo_trainer.runtime import RunContext
from apo_trainer.sample import load_samples

PLACEHOLDERS = {
    "policy": "theta_t: the model to train, also the DPO reference",
    "reference": "the same as {policy} (for trainers that take the reference separately)",
    "pairs": "a folder holding train.jsonl, the round's pairs as a TRL preference dataset",
    "pairs_jsonl": "that train.jsonl file itself",
    "pairs_openrlhf": "the round's pairs as a JSONL file for OpenRLHF's default keys",
    "output": "the folder where the trainer must write theta_hat_{t+1} (inside the run folder, emptied first)",
    "round": "the round index t",
    "seed": "the config's seed",
    "run_dir": "the run folder (output_dir)",
}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TAIL = 5

TrainFn = Callable[[str, str, str], Any]


def check_command(template: str) -> None:
    """Before any work: placeholders known, quoting closed, the program an executable on PATH (or a path)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"config: train_command: {e}; write a literal brace as {{{{ or }}}}") from None
    for name in names:
        if name not in PLACEHOLDERS:
            known = ", ".join(f"{{{k}}}" for k in PLACEHOLDERS)
            raise ConfigError(
                f"config: train_command has the unknown placeholder {{{shown(name, quote=False)}}}; the known ones "
                f"are {known} (a literal brace is written {{{{ or }}}})"
            )
    try:
        argv = shlex.split(template)
    except ValueError as e:
        raise ConfigError(f"config: train_command cannot be split into words ({e}); close its quotes") from None
    if not argv:
        raise ConfigError("config: train_command is blank; give the trainer's command line or drop the key")
    if "{" not in argv[0] and shutil.which(argv[0]) is None:
        raise ConfigError(
            f"config: train_command runs {shown(argv[0])}, which is not an executable on PATH nor an executable "
            "file; install it, activate its environment, or give its full path",
            exit_code=1,
        )


def render(template: str, values: dict[str, Any]) -> list[str]:
    """The argument list: the template split into words as a POSIX shell would (no shell runs), then each word's
    placeholders filled in, so a path with spaces stays one argument."""
    return [word.format(**values) for word in shlex.split(template)]


def run(ctx: RunContext, t: int, policy_path: str, train_fn: TrainFn | None = None) -> tuple[dict[str, Any], None]:
    """Round ``t``'s train phase by the external trainer; saves round-<t>/trained (main process only)."""
    summary: dict[str, Any] = {"train": "external"}
    if ctx.is_main:
        store = ctx.store
        pairs_dir, orlhf = write_pairs(ctx, t)
        out = store.round_dir(t) / "external"
        stop_stale(store.round_dir(t) / "train.pid")
        if out.exists():  # a rerun: the last attempt's (maybe partial) output goes; out is inside the run folder
            shutil.rmtree(out)
        out.mkdir(parents=True)
        values = {
            "policy": policy_path,
            "reference": policy_path,
            "pairs": str(pairs_dir),
            "pairs_jsonl": str(pairs_dir / "train.jsonl"),
            "pairs_openrlhf": str(orlhf),
            "output": str(out),
            "round": t,
            "seed": ctx.config.seed,
            "run_dir": str(store.root),
        }
        log = store.round_dir(t) / "train.log"
        n_pairs = len(load_pairs(ctx, t))
        if n_pairs == 0:  # every prompt tied: no step, theta_hat_{t+1} = theta_t (as apo-train's own train phase)
            _save_trained(ctx, t, ctx.load_policy(policy_path, device="cpu"))
            return {**summary, "output": "none", "train_pairs": 0, "steps": 0}, None
        if train_fn is None:
            argv = render(ctx.config.train_command, values)
            summary["train_command"] = shlex.join(argv)
            _run_command(t, argv, log, echo=not ctx.quiet)
        else:
            named = getattr(train_fn, "func", train_fn)  # a functools.partial is named by its function
            summary["train_fn"] = f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', '?')}"
            train_fn(policy_path, str(pairs_dir), str(out))
        found = find_output(out)
        if found is None:
            raise TrainError(
                f"round {t}: the trainer exited with code 0 but wrote no model into {out} (no config.json with "
                f"weights, adapter, DCP folder or checkpoint-N){_tail_of(log)}; make it save there ({{output}}) "
                "and rerun the same command"
            )
        kind, path = found
        _save_trained(ctx, t, load_output(ctx, t, policy_path, kind, path))
        shutil.rmtree(store.round_dir(t) / "external-hf", ignore_errors=True)  # a DCP output's export, now copied
        summary.update(output=kind, output_path=str(path.relative_to(store.root)), train_pairs=n_pairs)
        summary.update(trainer_log(path, out))
    return summary, None


def _save_trained(ctx: RunContext, t: int, model: Any) -> None:
    store = ctx.store
    tmp = store.tmp_path(store.trained(t))
    model.save_pretrained(tmp)
    ctx.tokenizer.save_pretrained(tmp)
    store.commit(tmp, store.trained(t), round_index=t, phase="train")


def write_pairs(ctx: RunContext, t: int) -> tuple[Path, Path]:
    """round-<t>/pairs-trl/train.jsonl and round-<t>/pairs-openrlhf.jsonl from round-<t>/pairs.jsonl."""
    store = ctx.store
    chat = bool(ctx.config.chat_template and getattr(ctx.tokenizer, "chat_template", None))
    trl, orlhf = trainer_rows(load_pairs(ctx, t), load_samples(ctx, t), ctx.tokenizer, chat)
    folder = store.round_dir(t) / "pairs-trl"
    store.write_jsonl(folder / "train.jsonl", trl)
    store.write_jsonl(store.round_dir(t) / "pairs-openrlhf.jsonl", orlhf)
    return folder, store.round_dir(t) / "pairs-openrlhf.jsonl"


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when apo-train dies, so a killed run leaves no trainer behind
    writing into a folder the rerun clears."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_stale(pid_file: Path) -> None:
    """Kill what a killed run's trainer left behind: its process group (the command runs in its own session, and
    launchers such as ``trl`` or ``accelerate launch`` start children that outlive a SIGKILLed parent). The run
    lock guarantees the run that started them is gone; an unreadable file or a vanished group is nothing to do."""
    try:
        pgid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    _kill_group(pgid)
    pid_file.unlink(missing_ok=True)


def _kill_group(pgid: int) -> None:
    for _ in range(200):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def _run_command(t: int, argv: list[str], log: Path, *, echo: bool) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
    pid_file = log.with_name("train.pid")
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except OSError as e:
        raise TrainError(
            f"round {t}: cannot start the train command {shown(argv[0])} ({e.strerror or e}); check train_command"
        ) from None
    pid_file.write_text(f"{proc.pid}\n")
    try:
        with log.open("wb") as fh:
            for raw in iter(proc.stdout.readline, b""):
                fh.write(raw)
                fh.flush()
                if echo:
                    sys.stderr.buffer.write(raw)
                    sys.stderr.flush()
                text = raw.decode("utf-8", "replace").replace("\r", "\n").strip()
                tail.extend(x.strip() for x in text.splitlines() if x.strip())
            rc = proc.wait()
    finally:
        # Ctrl-C or an error here, or children left running after the command returned: none outlive the phase.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_group(proc.pid)
        proc.stdout.close()
        pid_file.unlink(missing_ok=True)
    if rc != 0:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        last = shorten(" | ".join(tail), 400) or "(no output)"
        raise TrainError(
            f"round {t}: the train command {how}; last lines of {log}: {last}; fix the cause and rerun the same "
            "apo-train command (the round's training runs again)"
        )


def _tail_of(log: Path) -> str:
    if not log.is_file():
        return ""
    lines = [x.strip() for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    return f"; last lines of {log}: {shorten(' | '.join(lines[-_TAIL:]), 400)}" if lines else ""


def find_output(folder: Path) -> tuple[str, Path] | None:
    """(kind, folder) of what a trainer wrote: 'hf', 'lora' or 'dcp', else the last checkpoint-N's; None if none."""
    from apo_merge.dcp import is_dcp

    if (folder / "config.json").is_file() and any((folder / w).is_file() for w in _WEIGHTS):
        return "hf", folder
    if (folder / "adapter_config.json").is_file():
        return "lora", folder
    if is_dcp(folder):
        return "dcp", folder
    steps = []
    for p in folder.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            steps.append((int(m.group(1)), p))
    return find_output(max(steps)[1]) if steps else None


def load_output(ctx: RunContext, t: int, policy_path: str, kind: str, path: Path) -> Any:
    """theta_hat_{t+1} on the CPU in the run's dtype from the trainer's output, checked against theta_t's
    architecture (model_type, tensor names and shapes)."""
    from transformers import AutoConfig

    want = AutoConfig.from_pretrained(policy_path)
    try:
        if kind == "lora":
            from peft import PeftModel

            from apo_trainer import lora

            peft_model = PeftModel.from_pretrained(ctx.load_policy(policy_path, device="cpu"), str(path))
            model = lora.merge_and_unload(peft_model)  # theta_t + s B A in float64, one rounding
        else:
            if kind == "dcp":
                path = _export_dcp(ctx, t, path, policy_path)
            got = AutoConfig.from_pretrained(str(path))
            if got.model_type != want.model_type:
                raise TrainError(
                    f"round {t}: the trainer wrote a {shown(got.model_type)} model into {path}, but theta_t is "
                    f"{shown(want.model_type)}; APO extrapolates between checkpoints of one architecture: train "
                    "{policy} itself"
                )
            model = ctx.load_policy(path, device="cpu")
    except TrainError:
        raise
    except Exception as e:  # noqa: BLE001 - a partial or broken output, named in one line
        raise TrainError(
            f"round {t}: cannot read the trainer's output {path} ({first_line(e, typed=True)}); it is partial or "
            "not a causal LM checkpoint; rerun the same command (the round's training runs again)"
        ) from None
    _check_shapes(t, model, want, path)
    return model


def _check_shapes(t: int, model: Any, want: Any, path: Path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        ref = AutoModelForCausalLM.from_config(want)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for name, tensor in model.state_dict().items():
        shape = expected.pop(name, None)
        if shape != tuple(tensor.shape):
            where = "is not in theta_t" if shape is None else f"has shape {tuple(tensor.shape)}, theta_t's {shape}"
            raise TrainError(
                f"round {t}: the trainer's output {path} differs from theta_t's architecture ({shown(name)} {where}); "
                "APO extrapolates between checkpoints of one architecture: train {policy} itself"
            )
    if expected:
        raise TrainError(
            f"round {t}: the trainer's output {path} lacks {len(expected)} tensors of theta_t (e.g. "
            f"{shown(next(iter(expected)))}); it saved part of the model: make it save the whole model"
        )


def _export_dcp(ctx: RunContext, t: int, path: Path, policy_path: str) -> Path:
    from apo_merge.dcp import export_hf

    hf = ctx.store.round_dir(t) / "external-hf"
    if hf.exists():
        shutil.rmtree(hf)
    return export_hf(path, hf, config_from=policy_path)


def trainer_log(path: Path, out: Path) -> dict[str, Any]:
    """Steps and losses from a Hugging Face Trainer's trainer_state.json (the output's, or the last checkpoint's)."""
    states = [path / "trainer_state.json", out / "trainer_state.json"]
    steps = sorted(
        (int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    )
    states += [p / "trainer_state.json" for _, p in reversed(steps)]
    for state in states:
        if not state.is_file():
            continue
        try:
            data = json.loads(state.read_text(encoding="utf-8"))
            losses = [float(h["loss"]) for h in data.get("log_history", []) if "loss" in h]
            losses = [x for x in losses if math.isfinite(x)]  # the record is strict JSON
            summary: dict[str, Any] = {"steps": int(data.get("global_step", 0))}
        except (ValueError, TypeError, KeyError, AttributeError):
            return {}
        if losses:
            summary.update(train_loss=sum(losses) / len(losses), train_first_loss=losses[0])
            summary["train_final_loss"] = losses[-1]
        return summary
    return {}
