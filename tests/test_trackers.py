"""Optional experiment trackers: --wandb PROJECT and --tensorboard mirror log.jsonl (and the evaluation) and are
imported only when asked for. The packages are not dependencies, so small stand-ins record what the code sends."""
import json
import sys
import types

import pytest

import mae
from common import eval as evaluation

TINY = ["--model", "vit_micro", "--n_per_class", "4", "2", "--global_batch", "8", "--epochs", "2", "--log_every", "1",
        "--eval", "knn"]


class FakeRun:
    def __init__(self, calls, **kwargs):
        self.calls = calls
        calls.append(("init", kwargs))

    def log(self, numbers, step):
        self.calls.append(("log", step, dict(numbers)))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_trackers(monkeypatch):
    calls = {"wandb": [], "tensorboard": []}
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: FakeRun(calls["wandb"], **kwargs)
    wandb.util = types.SimpleNamespace(generate_id=lambda: f"run{len(calls['wandb'])}")
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    class SummaryWriter:
        def __init__(self, log_dir):
            calls["tensorboard"].append(("open", log_dir))

        def add_scalar(self, key, value, step):
            calls["tensorboard"].append((key, value, step))

        def close(self):
            calls["tensorboard"].append(("close",))
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    return calls


def test_trackers_mirror_the_log_and_the_evaluation(tmp_path, fake_trackers):
    run = tmp_path / "run"
    mae.main(TINY + ["--output_dir", str(run), "--wandb", "mim", "--tensorboard"])
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    wandb = fake_trackers["wandb"]
    init = [c for c in wandb if c[0] == "init"]
    assert init[0][1]["project"] == "mim" and init[0][1]["config"]["model"] == "vit_micro"
    logged = [(c[1], c[2]) for c in wandb if c[0] == "log"]
    for record in log:                                   # every log.jsonl line, at its step, with its numbers
        assert (record["step"], {k: v for k, v in record.items() if k != "step"}) in logged
    evaluation_numbers = logged[-1][1]                   # the end-of-run evaluation, into the same W&B run
    assert "eval/mae vit_micro/knn/10" in evaluation_numbers and init[-1][1]["id"] == init[0][1]["id"]
    assert wandb.count(("finish",)) == len(init)
    scalars = {(c[0], c[2]) for c in fake_trackers["tensorboard"] if len(c) == 3}
    assert ("loss", 1) in scalars and ("loss", len(log)) in scalars
    assert fake_trackers["tensorboard"][0] == ("open", str(run / "tensorboard"))


def test_a_resumed_run_continues_its_wandb_run(tmp_path, fake_trackers):
    run = tmp_path / "run"
    mae.main(TINY + ["--output_dir", str(run), "--wandb", "mim", "--max_steps", "1", "--eval", "none"])
    mae.main(TINY + ["--output_dir", str(run), "--wandb", "mim", "--resume", "auto", "--eval", "none"])
    ids = [c[1]["id"] for c in fake_trackers["wandb"] if c[0] == "init"]
    assert len(ids) == 2 and ids[0] == ids[1]


def test_the_evaluation_cli_tracks_too(tmp_path, fake_trackers, micro_checkpoint):
    micro_checkpoint(tmp_path / "c.pth")
    evaluation.main(["--ckpt", str(tmp_path / "c.pth"), "--n_per_class", "4", "2", "--num_workers", "0",
                     "--wandb", "mim", "--out_dir", str(tmp_path / "out")])
    logged = [c[2] for c in fake_trackers["wandb"] if c[0] == "log"]
    assert any(key.endswith("/knn/10") for numbers in logged for key in numbers)


def test_without_the_flags_nothing_is_imported_and_without_the_package_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)                  # importing it would fail
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    mae.main(TINY + ["--output_dir", str(tmp_path / "plain"), "--max_steps", "1", "--eval", "none"])
    with pytest.raises(SystemExit, match="--wandb needs the wandb package, which is not installed; pip install wandb"):
        mae.main(TINY + ["--output_dir", str(tmp_path / "w"), "--wandb", "mim"])
    with pytest.raises(SystemExit, match="--tensorboard needs the tensorboard package"):
        mae.main(TINY + ["--output_dir", str(tmp_path / "t"), "--tensorboard"])
