"""benchmarks/gpu_check.py runs its checks on CPU (gloo, a tiny GPT), so the GPU check script cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
CHECKS = [
    "bf16_speed_memory",
    "fp32_losses",
    "sharding_full",
    "weight_gradients_batched",
    "activation_checkpointing_layer",
    "timeline",
    "fp16_losses",
]
HEADLINE = re.compile(
    r"gpu_check passed=(\d+)/(\d+) bfpp_over_auto_tokens=(\S+) bfpp_over_auto_peak_memory=(\S+) "
    r"host_syncs_per_step=(\S+)"
)


def test_gpu_check_passes_every_check_on_cpu() -> None:
    code, output = run_script(ROOT / "benchmarks" / "gpu_check.py", ["--cpu", "--quick"], timeout=180, cwd=ROOT)
    results = dict(re.findall(r"^check (\w+): (ok|FAILED)", output, re.MULTILINE))
    assert list(results) == CHECKS, output[-4000:]
    failed = [name for name, verdict in results.items() if verdict != "ok"]
    assert not failed, f"failed checks {failed}:\n{output[-4000:]}"
    headline = HEADLINE.fullmatch(output.strip().splitlines()[-1])
    assert headline is not None, output[-2000:]
    assert headline.group(1) == headline.group(2) == str(len(CHECKS))
    assert float(headline.group(3)) > 0  # tokens/s ratio; the peak memory ratio is nan on CPU
    assert headline.group(4) == "nan"
    assert float(headline.group(5)) <= 1  # on CPU: the package's host reads in a steady-state step
    assert code == 0, output[-4000:]


COMPARE_HEADLINE = re.compile(
    r"gpu_compare devices=2 bf_over_1f1b=(\S+) predicted=(\S+) measured_over_predicted_bf=(\S+) "
    r"measured_over_predicted_1f1b=(\S+)"
)


def test_gpu_check_compares_breadth_first_and_1f1b_on_two_cpu_processes() -> None:
    """``--devices 2 --cpu --quick``: two gloo processes train breadth-first (L = 2) and 1F1B at M = 1 and print each
    step measured against the simulator's prediction; every figure is a positive finite number."""
    args = ["--cpu", "--quick", "--devices", "2"]
    code, output = run_script(ROOT / "benchmarks" / "gpu_check.py", args, timeout=240, cwd=ROOT)
    assert code == 0, output[-4000:]
    assert re.search(r"^compare breadth_first L=2: measured \S+ ms predicted \S+ ms", output, re.MULTILINE), output
    assert re.search(r"^compare 1f1b L=1: measured \S+ ms predicted \S+ ms", output, re.MULTILINE), output
    headline = COMPARE_HEADLINE.fullmatch(output.strip().splitlines()[-1])
    assert headline is not None, output[-2000:]
    figures = [float(x) for x in headline.groups()]
    assert all(0 < x < 100 for x in figures), figures
