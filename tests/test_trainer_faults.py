"""The trainer under faults: bad settings caught before any work, resuming a finished, missing,
changed or interrupted run, divergence, Ctrl-C, and checkpoint writes that are interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_pose
from trainer import ConfigError, Trainer, TrainingDiverged, load_config
from trainer.checkpoints import save_atomically

from conftest import ROOT

TINY = {
    "synthetic_train": 10, "synthetic_val": 4, "input_size": [64, 96], "heatmap_size": [16, 24], "sigma": 1.0,
    "model": "simplebaseline_res18_small", "epochs": 1, "batch_size": 4, "workers": 0, "log_every": 1,
    "progress": False, "lr_steps": [1], "loss": "hg",
}  # fmt: skip


def tiny_config(tmp_path, name="run", **settings):
    return load_config(None, {**TINY, "data_root": str(tmp_path / "data"), "out": str(tmp_path / name), **settings})


def train_records(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


# ------------------------------------------------------------------------------------------------
# Settings


BAD_SETTINGS = [
    ("augment", "maybe", "augment must be true or false, got 'maybe'"),
    ("epochs", "ten", "epochs must be an integer >= 1, got 'ten'"),
    ("input_size", 64, "input_size must be 2 integers >= 1, e.g. 192,256, got "),
    ("eval_every", 0, "eval_every must be an integer >= 1, got 0"),
    ("log_every", 0, "log_every must be an integer >= 1, got 0"),
    ("grad_weight", -1, "grad_weight must be a number >= 0, got -1"),
    ("stencil", "bogus", "stencil must be one of ['forward', 'central', 'sobel'], got 'bogus'"),
    ("lr_factor", -1, "lr_factor must be a number > 0 and <= 1, got -1"),
    ("lr", "fast", "lr must be a number > 0, got 'fast'"),
    ("lr_steps", [72, 60], "lr_steps must be increasing, got [72, 60]"),
    ("device", "tpu", "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("dark_kernel", 4, "dark_kernel must be odd, or 0 to match sigma, got 4"),
    ("dark_kernel", -1, "dark_kernel must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize("name, value, message", BAD_SETTINGS, ids=[name for name, _, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_naming_it_before_any_work(tmp_path, capsys, name, value, message):
    config_file = tmp_path / "settings.yaml"
    config_file.write_text(f"{name}: {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(config_file), {"out": str(tmp_path / "out")})
    assert message in str(caught.value) and "\n" not in str(caught.value)
    flag_value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    code = _exit_code(train_pose.main, [f"--{name.replace('_', '-')}", flag_value, "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "out").exists(), "work started before the settings were checked"


def _exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as stop:  # argparse refuses a flag's value itself
        return stop.code


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA settings on a machine without CUDA")
def test_cuda_settings_are_refused_before_any_work_without_cuda(tmp_path):
    with pytest.raises(ConfigError, match="backend 'cuda' is not available for cpu tensors"):
        tiny_config(tmp_path, backend="cuda")
    with pytest.raises(ConfigError, match="device 'cuda' needs CUDA"):
        tiny_config(tmp_path, device="cuda")
    assert not (tmp_path / "data").exists()


def test_yaml_values_take_their_settings_types(tmp_path):
    config_file = tmp_path / "settings.yaml"
    # PyYAML reads 1e-3 as a string (YAML 1.1 floats need a dot) and yes as true.
    config_file.write_text("lr: 1e-3\naugment: yes\ninput_size: [64, 96]\nlr_steps: 60,72\npretrained:\n")
    config = load_config(str(config_file), {})
    assert (config.lr, config.augment, config.input_size, config.lr_steps, config.pretrained) == (
        0.001, True, [64, 96], [60, 72], "")
    (tmp_path / "list.yaml").write_text("- lr\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping of settings, got list"):
        load_config(str(tmp_path / "list.yaml"), {})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"), {})


def test_help_describes_every_setting_with_what_it_accepts(capsys):
    with pytest.raises(SystemExit):
        train_pose.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--loss {mse,hg,hg+sd} mse (HRNet's JointsMSELoss)" in text
    assert "--eval-every VALUE evaluate every this many epochs (and after the last); an integer >= 1 [1]" in text
    assert "--lr-factor VALUE factor of each learning-rate drop; a number > 0 and <= 1 [0.1]" in text


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "run" / "last.pt").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="last.pt is a folder"):
        Trainer(tiny_config(tmp_path))
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------------------
# Resuming


def test_resume_auto_of_a_finished_run_changes_nothing_and_more_epochs_continue(tmp_path, capsys):
    metrics = Trainer(tiny_config(tmp_path)).fit()
    out = tmp_path / "run"
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "config.yaml", "log.jsonl", "last.pt")}
    assert Trainer(tiny_config(tmp_path), resume="auto").fit() == metrics
    assert "has trained its 1 epochs; nothing to do" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before

    Trainer(tiny_config(tmp_path, epochs=2), resume="auto").fit()
    assert [record["epoch"] for record in train_records(out)][-1] == 2
    assert torch.load(out / "last.pt", weights_only=True)["run"]["next_epoch"] == 2


def test_a_resumed_run_keeps_counting_its_time_from_where_the_checkpoint_left_it(tmp_path):
    first_part = Trainer(tiny_config(tmp_path))
    first_part.fit()
    saved_seconds = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["run"]["seconds"]
    assert saved_seconds == first_part.state.seconds > 0

    second_part = Trainer(tiny_config(tmp_path, epochs=2), resume="auto")
    second_part.fit()
    assert second_part.state.seconds > saved_seconds
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["run"]["seconds"] == second_part.state.seconds


def test_resume_auto_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, capsys):
    Trainer(tiny_config(tmp_path), resume="auto").fit()
    assert "no checkpoint at" in capsys.readouterr().err and (tmp_path / "run" / "last.pt").is_file()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from at"):
        Trainer(tiny_config(tmp_path, name="other"), resume=str(tmp_path / "missing.pt"))


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    Trainer(tiny_config(tmp_path)).fit()
    with pytest.raises(ConfigError, match=r"other settings than these: batch_size 4 -> 2, lr 0.001 -> 0.01"):
        Trainer(tiny_config(tmp_path, epochs=2, batch_size=2, lr=0.01), resume="auto")


def test_resume_after_an_interruption_logs_every_step_once_and_continues_exactly(tmp_path):
    straight_config = tiny_config(tmp_path, name="straight", epochs=2)
    Trainer(straight_config).fit()

    first_epoch_steps = sum(record["epoch"] == 1 for record in train_records(tmp_path / "straight"))

    interrupted = Trainer(tiny_config(tmp_path, epochs=2))
    loss_forward = interrupted.criterion.forward

    def interrupt_at_the_second_step_of_epoch_2(*args):
        if interrupted.state.step == first_epoch_steps + 1:
            raise KeyboardInterrupt
        return loss_forward(*args)

    interrupted.criterion.forward = interrupt_at_the_second_step_of_epoch_2
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    out = tmp_path / "run"
    logged = [record["step"] for record in train_records(out)]
    assert logged == list(range(1, first_epoch_steps + 2))  # epoch 1, and the interrupted epoch's first step

    Trainer(tiny_config(tmp_path, epochs=2), resume="auto").fit()
    steps = lambda folder: [(r["step"], r["loss"]) for r in train_records(folder)]  # noqa: E731
    assert [step for step, _ in steps(out)] == list(range(1, 2 * first_epoch_steps + 1))
    assert steps(out) == steps(tmp_path / "straight")


# ------------------------------------------------------------------------------------------------
# Divergence, Ctrl-C, interrupted writes


def test_a_diverging_run_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=3))
    steps_per_epoch = len(trainer.train_loader)
    model_forward = trainer.student.forward

    def diverge_at_the_second_step_of_epoch_2(images):
        output = model_forward(images)
        diverging = trainer.student.training and trainer.state.step == steps_per_epoch + 1
        return output * float("nan") if diverging else output

    trainer.student.forward = diverge_at_the_second_step_of_epoch_2
    with pytest.raises(TrainingDiverged, match=rf"the loss diverged at step {steps_per_epoch + 2} \(epoch 2\): the "
                                               r"model's heatmaps are not finite; .*last.pt holds the run after epoch 1"):
        trainer.fit()
    kept = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert kept["run"]["next_epoch"] == 1
    assert all(torch.isfinite(tensor).all() for tensor in kept["model"].values() if tensor.is_floating_point())


def test_an_absurd_learning_rate_ends_with_one_line_saying_the_loss_diverged(tmp_path, capsys):
    flags = [f"--{key.replace('_', '-')}={','.join(map(str, value)) if isinstance(value, list) else value}"
             for key, value in {**TINY, "epochs": 4}.items()]
    code = train_pose.main([*flags, "--lr", "1e30", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.splitlines()
    assert code == 1 and error[-1].startswith("train_pose.py: error: the loss diverged at step ")


def test_ctrl_c_exits_with_one_line_and_leaves_no_temporary_file(tmp_path):
    flags = [f"--{key.replace('_', '-')}={','.join(map(str, value)) if isinstance(value, list) else value}"
             for key, value in {**TINY, "epochs": 100_000, "eval_every": 100_000}.items()]
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "examples", "train_pose.py"), *flags, "--data-root", str(tmp_path / "data"),
         "--out", str(tmp_path / "run")], stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # A shell without job control starts background commands with SIGINT ignored, and a child
        # inherits that; Python then never raises KeyboardInterrupt. The run gets the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (tmp_path / "run" / "last.pt").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be interrupted"
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error[-2000:]
    assert "Traceback" not in error
    assert error.strip().splitlines()[-1].startswith("train_pose.py: interrupted; ")
    assert "--resume auto" in error
    assert not list((tmp_path / "run").glob("*.tmp"))
    torch.load(tmp_path / "run" / "last.pt", weights_only=True)


def test_an_interrupted_checkpoint_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomically({"step": 1}, path)

    def interrupted_save(state, destination):
        with open(destination, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomically({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert not list(tmp_path.glob("*.tmp"))
