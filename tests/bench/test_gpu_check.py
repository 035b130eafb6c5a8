"""bench/gpu_check.sh: the dry run goes through every step's entry point on the CPU, and the summary's arithmetic
against the targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parents[2]
STEPS = ["install", "env", "pytest-gpu", "kernel", "merge-e2e", "trainer-phases"]


@pytest.mark.slow
def test_dry_run_goes_through_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry"],
        cwd=tmp_path,  # the script finds the repository itself
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "summary.json").read_text())
    assert report["dry"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    for s in steps.values():
        assert s["command"]
        if s["status"] == "skipped":
            assert s["reason"] and s["exit_status"] is None, s
        else:
            assert s["status"] == "ok" and s["exit_status"] == 0 and (out / s["log"]).is_file(), s
    assert steps["install"]["status"] == steps["pytest-gpu"]["status"] == "skipped"
    assert steps["kernel"]["status"] == steps["merge-e2e"]["status"] == steps["trainer-phases"]["status"] == "ok"
    assert "pip install --no-deps" in steps["install"]["command"] and "-m gpu" in steps["pytest-gpu"]["command"]

    assert steps["kernel"]["figures"]["cpu_twin_over_lerp"] > 0
    methods = steps["merge-e2e"]["figures"]["methods"]
    assert set(methods) == {"floor", "floor-tuned", "apo-cpu"}  # apo-cuda needs CUDA
    assert methods["apo-cpu"]["exactness"]["differing"] == 0 and methods["apo-cpu"]["exactness"]["compared"] > 0
    phases = steps["trainer-phases"]["figures"]["phases"]
    assert [r["round"] for r in phases["rounds"]] == [0, 1]
    assert steps["trainer-phases"]["figures"]["sampling"] is None

    assert len(report["targets"]) == 6
    assert all(t["measured"] is None and t["met"] is None for t in report["targets"])
    assert report["env"]["cuda_available"] is False
    assert "summary.json" in (out / "gpu_check.log").read_text()


def _fake_run(out: Path, *, kernel_ratio: float, in_place_ms: float, merge_ratio: float, sampler: float) -> None:
    rows = [
        ("install", "ok", "0", "3.0", "", "pip install --no-deps -e ."),
        ("pytest-gpu", "ok", "0", "50.0", "", "pytest -m gpu"),
        ("kernel", "ok", "0", "40.0", "", "kernel.py"),
        ("merge-e2e", "failed", "1", "90.0", "", "merge_e2e.py"),
        ("trainer-phases", "skipped", "", "0", "no CUDA", "trainer_phases.py"),
    ]
    (out / "steps.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    (out / "pytest.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="a" name="x"/><testcase classname="a" name="y"><failure/></testcase>'
        '<testcase classname="b" name="z"/></testsuite></testsuites>'
    )
    kernel = {
        "large_bf16_kernel_over_lerp": kernel_ratio,
        "8b_ms": {"lerp_loop": 12.0, "grouped": 11.0, "in_place": in_place_ms},
        "8b_grouped_identical_to_per_tensor": True,
    }
    (out / "kernel.json").write_text(json.dumps(kernel))
    cuda = {
        "seconds": {"median": 5.5},
        "ratio_to_floor": 1.0,
        "ratio_to_floor_tuned": merge_ratio,
        "gb_per_s": 2.0,
        "peak_anon": 1,
        "exactness": {"differing": 0, "compared": 10, "missing_tensors": 0},
    }
    (out / "merge_e2e.json").write_text(json.dumps({"results": {"apo-cuda": cuda}}))
    (out / "trainer_phases.json").write_text(json.dumps({"sampling": {"static_over_plain": sampler}}))


def test_summary_compares_each_figure_with_its_target(tmp_path):
    _fake_run(tmp_path, kernel_ratio=0.98, in_place_ms=25.0, merge_ratio=1.05, sampler=7.9)
    assert gpu_check.summary(tmp_path, dry=False) == 1  # a step failed
    report = json.loads((tmp_path / "summary.json").read_text())
    met = {t["name"].split(":")[0] + ":" + t["target"]: (t["measured"], t["met"]) for t in report["targets"]}
    assert met == {
        "gpu tests all pass:every gpu test passes": (2, False),
        "kernel:>= 0.97": (0.98, True),
        "kernel:<= 1.0": (11.0 / 12.0, True),
        "kernel:< 20": (25.0, False),
        "merge:<= 1.10": (1.05, True),
        "sampler:>= 8": (7.9, False),
    }
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["pytest-gpu"]["figures"]["failed_tests"] == ["a::y"]
    assert steps["trainer-phases"]["figures"] is None and steps["trainer-phases"]["reason"] == "no CUDA"
    assert steps["merge-e2e"]["exit_status"] == 1 and steps["install"]["seconds"] == 3.0


def test_summary_exits_0_when_every_step_ran_or_was_skipped(tmp_path):
    _fake_run(tmp_path, kernel_ratio=0.9, in_place_ms=10.0, merge_ratio=1.2, sampler=9.0)
    text = (tmp_path / "steps.tsv").read_text().replace("failed\t1", "ok\t0")
    (tmp_path / "steps.tsv").write_text(text)
    assert gpu_check.summary(tmp_path, dry=False) == 0  # targets missed are findings, not a broken check
    targets = json.loads((tmp_path / "summary.json").read_text())["targets"]
    assert [t["met"] for t in targets] == [False, False, True, True, False, True]
