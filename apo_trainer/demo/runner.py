"""The demo: iterative DPO and APO from the same warmed-up toy policy, several seeds, then a report.

Layout of the output folder::

    OUTPUT/demo.json                  the settings (a rerun with the same settings resumes)
    OUTPUT/start/                     the warmed-up starting policy and its tokenizer
    OUTPUT/prompts.jsonl              the synthetic prompts
    OUTPUT/eval-prompts.jsonl         held-out prompts for the win rates against theta_0 (apo-train eval)
    OUTPUT/runs/<loss>-alpha<a>-seed<s>/   one apo-train run each (metrics.jsonl, round-<t>/ ...)
    OUTPUT/report.md, OUTPUT/report.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import platform
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from apo_merge.cliopts import setting
from apo_trainer.demo.report import Run, markdown_table, method_name, plot, table_rows, verdict
from apo_trainer.demo.task import ToyOracle, ToyTask, make_prompts, make_start, write_prompts
from apo_trainer.errors import ConfigError
from apo_trainer.log import quiet_libraries

START_SEED = 0


DPO_BETA, SPPO_BETA = 0.1, 0.01  # the loss temperature when none is given


def parse_alphas(text: str) -> tuple[float, ...]:
    """``--alphas 0,0.3`` -> (0.0, 0.3)."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.3") from None
    if not values or any(not 0 <= a < math.inf for a in values):
        raise ConfigError("give at least one alpha, none negative, e.g. 0,0.3")
    return values


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run depends on; the defaults finish in under 10 minutes on 2 CPU cores.

    The fields with a help text are the options of ``apo-train demo`` (apo_merge.cliopts builds them from here).
    """

    output: Path = setting(
        Path("apo-demo"), "Output folder (a rerun with the same settings resumes).", flag=("--output", "-o")
    )
    rounds: int = setting(3, "APO rounds per run.", min=1)
    seeds: int = setting(3, "Seeds per method (spread over seeds is reported).", min=1)
    alphas: tuple[float, ...] = setting(
        (0.0, 0.3),
        "Comma-separated extrapolation weights; 0 is plain iterative DPO/SPPO.",
        type=str,
        parse=parse_alphas,
        text=lambda alphas: ",".join(f"{a:g}" for a in alphas),
    )
    loss: str = setting("dpo", "Preference loss: dpo or sppo.", choices=("dpo", "sppo"))
    prompts_per_round: int = setting(512, "Fresh prompts per round.", min=8)
    samples_per_prompt: int = setting(8, "Samples per prompt.", min=2, flag="--samples")
    beta: float | None = setting(
        None, f"Loss temperature (default {DPO_BETA:g} for DPO, {SPPO_BETA:g} for SPPO).", type=float
    )
    learning_rate: float = 3e-4
    epochs_per_round: int = 2
    batch_size: int = 16
    eval_prompts: int = setting(128, "Held-out prompts for the win rates against theta_0 (and the final round).", min=8)
    task: ToyTask = setting(help="The toy task and its warm-up.", group=ToyTask)
    restart: str = setting(
        "none",
        "Momentum restart: 'score' extrapolates with alpha 0 after a round whose mean reward dropped; 'none' never "
        "restarts.",
        choices=("none", "score"),
    )
    peft: dict = field(default_factory=dict)  # LoRA rounds (apo-train's peft group); {} = full fine-tuning

    def __post_init__(self) -> None:
        for name in ("loss", "restart"):
            allowed = {f.name: f for f in dataclasses.fields(self)}[name].metadata["choices"]
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; use {' or '.join(allowed)}")
        if self.beta is None:
            object.__setattr__(self, "beta", DPO_BETA if self.loss == "dpo" else SPPO_BETA)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        d["alphas"] = list(self.alphas)
        if self.restart == "none":  # the stamp of a demo folder from before the option still matches
            del d["restart"]
        return d


def trainer_config(settings: DemoSettings, start: Path, prompts: Path, alpha: float, seed: int):
    """The apo-train config of one demo run (the toy reward is passed as an Oracle object, see ``run_demo``)."""
    from apo_trainer.config import APOConfig

    task = settings.task
    return APOConfig(
        model=str(start),
        prompts=str(prompts),
        oracle="callable:apo_trainer.demo.task:" + ("rewards_free_length" if task.free_length else "rewards"),
        output_dir=str(run_folder(settings, alpha, seed)),
        rounds=settings.rounds,
        alpha=alpha,
        restart=settings.restart,
        loss=settings.loss,
        beta=settings.beta,
        learning_rate=settings.learning_rate,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        epochs_per_round=settings.epochs_per_round,
        batch_size=settings.batch_size,
        grad_accum=1,
        samples_per_prompt=settings.samples_per_prompt,
        prompts_per_round=settings.prompts_per_round,
        max_new_tokens=task.response_words + (4 if task.free_length else 0),
        min_new_tokens=1 if task.free_length else task.response_words,
        temperature=1.0,
        top_p=1.0,
        generation_batch_size=512,
        logprob_batch_size=256,
        seed=seed,
        eval_prompts=str(prompts.parent / "eval-prompts.jsonl"),
        eval_temperature=1.0,
        peft=dict(settings.peft),
    )


def run_folder(settings: DemoSettings, alpha: float, seed: int) -> Path:
    restart = "" if settings.restart == "none" else f"-restart-{settings.restart}"
    lora = "-lora" if settings.peft else ""
    return settings.output / "runs" / f"{settings.loss}{lora}-alpha{alpha:g}{restart}-seed{seed}"


def prepare(settings: DemoSettings, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Write the settings, the prompts and the warmed-up start (each reused when already there)."""
    out = settings.output
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "demo.json"
    if stamp.exists() and json.loads(stamp.read_text()) != settings.to_json():
        raise ConfigError(
            f"{out} holds a demo run with other settings; pass another --output or delete {out}", exit_code=1
        )
    stamp.write_text(json.dumps(settings.to_json(), indent=1) + "\n")
    prompts = out / "prompts.jsonl"
    if not prompts.exists():
        write_prompts(
            prompts,
            make_prompts((settings.rounds + 1) * settings.prompts_per_round, settings.task, seed=START_SEED + 1),
        )
    held_out = out / "eval-prompts.jsonl"
    if not held_out.exists():
        write_prompts(held_out, make_prompts(settings.eval_prompts, settings.task, seed=START_SEED + 2))
    start = out / "start"
    if not (start / "config.json").exists():
        log(
            f"warm-up: {settings.task.warmup_steps} supervised steps on copy-with-p={settings.task.copy_prob} responses"
        )
        t0 = time.perf_counter()
        make_start(start, settings.task, START_SEED)
        log(f"warm-up done in {time.perf_counter() - t0:.0f} s")
    return start, prompts


def run_demo(
    settings: DemoSettings,
    *,
    jobs: int | None = None,
    log: Callable[[str], None] = print,
    on_record: Callable[[str, dict], None] | None = None,
) -> list[Run]:
    """Run every (alpha, seed) of ``settings`` from one warmed-up start and write report.md and report.png.

    ``jobs`` runs go at once, each in its own process with cpu_count / jobs torch threads (default: one per
    CPU core, at most 4): for a model this small, separate runs use the cores better than threads inside one.
    ``on_record(label, record)`` is called as each round's record appears (for progress display).
    """
    t0 = time.perf_counter()
    start, prompts = prepare(settings, log)
    cpus = os.cpu_count() or 1
    jobs = max(1, min(jobs or min(cpus, 4), len(settings.alphas) * settings.seeds))
    threads = max(1, cpus // jobs)
    work = {
        (alpha, seed): trainer_config(settings, start, prompts, alpha, seed)
        for alpha in settings.alphas
        for seed in range(1, settings.seeds + 1)
    }
    labels = {
        Path(c.output_dir) / "metrics.jsonl": f"{method_name(settings.loss, a)}, seed {s}" for (a, s), c in work.items()
    }
    results: dict[tuple[float, int], list[dict]] = {}
    with _watch(labels, on_record or (lambda label, rec: None)):
        if jobs == 1:
            for key, config in work.items():
                results[key] = _run_one(config, settings.task, threads=None)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=context) as pool:
                futures = {key: pool.submit(_run_one, config, settings.task, threads) for key, config in work.items()}
                results = {key: f.result() for key, f in futures.items()}
    runs = [Run(settings.loss, alpha, seed, results[(alpha, seed)]) for alpha, seed in work]
    write_report(settings, runs, time.perf_counter() - t0)
    return runs


def _run_one(config, task: ToyTask, threads: int | None) -> list[dict]:
    import torch

    from apo_trainer.loop import run as run_rounds

    if threads is not None:
        torch.set_num_threads(threads)
    from apo_trainer.evaluation import evaluate_run

    with quiet_libraries(True):
        records = run_rounds(config, ToyOracle(task), quiet=True)
        wins = evaluate_run(config.output_dir, oracle=ToyOracle(task), quiet=True)
    # win rates of theta_t against theta_0 on the held-out prompts, judged by the exact reward (Bradley-Terry)
    for rec, win in zip(records, wins, strict=False):
        rec.update(win_rate=win["win_rate"], lc_win_rate=win["lc_win_rate"])
    return records


def write_report(settings: DemoSettings, runs: list[Run], seconds: float | None = None) -> Path:
    """OUTPUT/report.md (table, verdict, how to reproduce) and OUTPUT/report.png."""
    out = settings.output
    task = settings.task
    title = (
        f"toy copy task: {settings.seeds} seed(s) per method (band: ±1 sd), {settings.prompts_per_round} "
        f"prompts x {settings.samples_per_prompt} samples per round, {settings.loss.upper()} beta "
        f"{settings.beta:g}"
    )
    plot(runs, out / "report.png", title)
    header, rows = table_rows(runs)
    length = (
        f"free length (end-of-sequence chosen by the policy, warm-up lengths {task.min_response_words}-"
        f"{task.response_words})"
        if task.free_length
        else f"exactly {task.response_words} words"
    )
    text = [
        "# APO demo: a known-reward toy task",
        "",
        f"Task: a prompt is {task.prompt_words} distinct random words out of 32; a response is {length}; the true "
        "reward is the fraction of response words that occur in the prompt (uniform guessing scores "
        f"{task.prompt_words / 32:.3f}). The policy is a 2-layer GPT-2 (0.4 M parameters) warmed up with "
        f"{task.warmup_steps} supervised steps on responses that copy a prompt word with probability "
        f"{task.copy_prob}. Every method starts from that same model; the oracle is the exact reward.",
        "",
        f"Each round: {settings.prompts_per_round} fresh prompts, {settings.samples_per_prompt} samples each, "
        f"{'best vs worst pairs, DPO' if settings.loss == 'dpo' else 'SPPO win-rate targets'} with beta "
        f"{settings.beta:g}, AdamW lr {settings.learning_rate:g} restarted per round, {settings.epochs_per_round} "
        f"epochs{_lora_text(settings.peft)}{_restart_text(settings)}. Round t's row is measured on the samples of the policy theta_t (round "
        f"{settings.rounds} is a final evaluation). KL to start: the trainer's estimate from the sampled log-probs. "
        f"Win rates: `apo-train eval` on {settings.eval_prompts} held-out prompts (one response each, temperature "
        "1), theta_t against theta_0's response judged by the exact reward through Bradley-Terry, and "
        "length-controlled as AlpacaEval 2.0 (round 0 is 0.5 by construction; the final round's reward is measured "
        f"on the held-out prompts too). {settings.seeds} seed(s) per method (seeds change the prompts, samples and "
        "training order).",
        "",
        markdown_table(header, rows),
        *[line + "\n" for line in verdict(runs)],
        "![reward, length, KL and win rates per round](report.png)",
        "",
        "Reproduce: `apo-train demo " + _cli_args(settings) + "`",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
        f"torch {_torch_version()}" + (f"; wall time of the command {seconds:.0f} s." if seconds is not None else "."),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def _restart_text(settings: DemoSettings) -> str:
    if settings.restart == "none":
        return ""
    return (
        "; momentum restart: a round whose mean reward falls below the previous round's is followed by an "
        "extrapolation with alpha 0"
    )


def _cli_args(settings: DemoSettings) -> str:
    task = settings.task
    args = [
        f"--rounds {settings.rounds}",
        f"--seeds {settings.seeds}",
        "--alphas " + ",".join(f"{a:g}" for a in settings.alphas),
        f"--loss {settings.loss}",
        f"--beta {settings.beta:g}",
        f"--prompts-per-round {settings.prompts_per_round}",
        f"--samples {settings.samples_per_prompt}",
        f"--eval-prompts {settings.eval_prompts}",
        f"--warmup-steps {task.warmup_steps}",
        "--free-length" if task.free_length else "--no-free-length",
        *([f"--restart {settings.restart}"] if settings.restart != "none" else []),
        *(["--peft"] if settings.peft else []),
        f"--output {settings.output}",
    ]
    return " ".join(args)


def _torch_version() -> str:
    import torch

    return torch.__version__


class _watch:
    """Call ``callback(label, record)`` for each new line of the JSONL files in ``paths`` while the block runs.

    Polls on a thread, so it follows runs in other processes too.
    """

    def __init__(self, paths: dict[Path, str], callback: Callable[[str, dict], object], every: float = 0.5) -> None:
        self.paths, self.callback, self.every = paths, callback, every
        self._stop = threading.Event()
        self._seen = {p: 0 for p in paths}
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._poll()

    def _poll(self) -> None:
        for path, label in self.paths.items():
            lines = _lines(path)
            for line in lines[self._seen[path] :]:
                self.callback(label, json.loads(line))
            self._seen[path] = len(lines)


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError:
        return []
    # metrics.jsonl is rewritten atomically, so a complete file ends with a newline
    return [ln for ln in text.split("\n")[:-1] if ln.strip()]


def _lora_text(peft: dict) -> str:
    if not peft:
        return ", every weight trained"
    return (
        f", LoRA rounds (r {peft['r']}, lora_alpha {peft['lora_alpha']:g}, {peft['target_modules']}; a fresh "
        "adapter per round merged exactly into theta_hat_{t+1})"
    )
