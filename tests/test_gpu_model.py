"""benchmarks/gpu_model.sh, the device run of `make model`: its steps are the Makefile's, with the
GPU's settings added, and every budget comes from the environment."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import benchmarks.transfer as transfer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_model.sh"
BUDGET = {"MODEL_EPOCHS": "7", "MODEL_STEPS": "123", "AASCE": "/data/packed aasce", "PRECISION": "bf16-mixed",
          "STAGE1_FILMS": "1600", "WORKERS": "5", "THREADS": "3", "PYTHON": "python3"}


def dry_run(tmp_path, **env) -> dict[str, list[str]]:
    """{stage: command tokens} as the script prints them with DRY_RUN=1."""
    done = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env, "DRY_RUN": "1", "OUT": str(tmp_path / "out")})
    assert done.returncode == 0, done.stderr
    stages = {}
    for line in done.stdout.splitlines():
        name, _, command = line.partition(": ")
        stages[name] = shlex.split(command)
    return stages


def makefile_model_commands(values: dict[str, str]) -> list[list[str]]:
    """The `model` recipe's Python commands, variables expanded (values first, then the
    Makefile's own), shell tests around them dropped."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"^(\w+)\s*[?:]?=\s*(.*)$", text, flags=re.M))
    recipe = re.search(r"^model:.*\n((?:\t.*\n)+)", text, flags=re.M).group(1)
    commands = []
    for line in recipe.splitlines():
        line = line.strip()
        if line.startswith("@"):
            continue
        line = re.sub(r"\$\$\(.*?\)\s*$", "", line)  # $$(test -f ... && echo --ckpt_path ...)
        line = re.sub(r"^test -f \S+ \|\| ", "", line)
        for _ in range(3):  # variables naming variables
            line = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), defaults.get(m.group(1), m.group(0))), line)
        commands.append(shlex.split(line))
    return commands


def is_subsequence(needle: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(token in it for token in needle)


def test_every_make_model_step_runs_in_order_with_the_same_options(tmp_path):
    stages = dry_run(tmp_path, **BUDGET)
    values = {"PY": "python3", "AASCE": shlex.quote(BUDGET["AASCE"]), "MODEL_EPOCHS": "7", "MODEL_STEPS": "123",
              "DEMO_PRECISION": "bf16-mixed"}
    make = makefile_model_commands(values)
    assert [c[2] if c[1] == "-m" else c[1] for c in make] == [
        "benchmarks.transfer", "data.simulate", "data.combine", "train.py", "training.export", "calibration"]
    names, script = list(stages), list(stages.values())
    found = []
    for command in make:
        match = [i for i, tokens in enumerate(script) if tokens[:3] == command[:3] and is_subsequence(command, tokens)]
        assert match, f"make model's step is not in gpu_model.sh with the same options: {command}"
        found.append(names[match[0]])
    assert found == ["stage1", "simulate", "combine", "stage2", "export", "calibration"]
    # the same order, except that the simulation (CPU only) starts beside stage 1
    order = [names.index(n) for n in found if n != "simulate"]
    assert order == sorted(order) and names.index("simulate") < names.index("combine")


def test_gpu_settings_and_budgets_reach_each_stage(tmp_path):
    stages = dry_run(tmp_path, **BUDGET, STAGE1_MAX_TIME="00:00:01:00", STAGE2_MAX_TIME="00:00:02:00",
                     AASCE_LIMIT="9", SIMULATED_PER_FILM="1")
    stage1 = stages["stage1"]
    train_args = shlex.split(stage1[stage1.index("--train-args") + 1])
    for args, max_time in ((train_args, "00:00:01:00"), (stages["stage2"], "00:00:02:00")):
        joined = " ".join(args)
        assert "--trainer.accelerator gpu" in joined and "--data.num_workers 5" in joined
        assert "--data.pin_memory true" in joined and "--trainer.precision bf16-mixed" in joined
        assert f"--trainer.max_time {max_time}" in joined
    assert stage1[stage1.index("--threads") + 1] == "3" and stage1[stage1.index("--epochs") + 1] == "7"
    simulate = " ".join(stages["simulate"])
    assert "--limit 9" in simulate and "--n 1" in simulate and "/data/packed aasce" in stages["simulate"]
    calibration = " ".join(stages["calibration"])
    assert "--device cuda" in calibration and "--num-workers 5" in calibration
    assert stages["export_fp32"][stages["export_fp32"].index("--storage") + 1] == "fp32"


def test_cpu_budget_turns_pinned_memory_off(tmp_path):
    stages = dry_run(tmp_path, ACCELERATOR="cpu", CALIBRATION_DEVICE="cpu")
    assert "--data.pin_memory false" in " ".join(stages["stage2"])
    assert "--device cpu" in " ".join(stages["calibration"])


def test_missing_packed_folder_stops_at_once(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WHEELS": "0", "AASCE": str(tmp_path / "nowhere"),
                               "PYTHON": "true", "OUT": str(tmp_path / "out")})
    assert done.returncode == 2
    assert f"{tmp_path / 'nowhere'}/filenames.csv: not found" in done.stderr


def test_transfer_passes_train_args_after_the_config(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(transfer, "run", lambda cmd, what, env=None, ok_codes=(0,): seen.append((cmd, env)) or 1.0)
    monkeypatch.setattr(transfer, "checkpoint_steps", lambda path: 12)
    info = transfer.stage_train("3d", tmp_path, 1, 16, "--trainer.accelerator gpu --trainer.precision bf16-mixed")
    cmd, env = seen[0]
    cmd = [str(c) for c in cmd]
    assert cmd[-4:] == ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed"]
    assert cmd.index("--config") < cmd.index("--trainer.accelerator")
    assert info["precision"] == "bf16-mixed" and env["OMP_NUM_THREADS"] == "16"


@pytest.mark.parametrize("name", ["gpu_model.sh", "gpu_check.sh"])
def test_scripts_are_valid_bash(name):
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / name)]).returncode == 0
