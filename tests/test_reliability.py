"""Nothing lost, nothing silent: faults and bad inputs end in one sentence or in the right behaviour.

Each test names the fault it injects: a diverging update, a second run in the same directory, --resume of a wrong
file, --ckpt of a bad file, an unlabelled folder, bad flag values, an unwritable directory, a full disk, a kill
between a log line and a checkpoint, a temporary file left by a kill during a save.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from PIL import Image

import mae
import mae_ct
import mim_refiner
import mimco
import mixmim
from common import checkpoints, config, data, optim, trainer as training
from common import eval as evaluation
from common.vit import create_vit, vit_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MAE = ["--model", "vit_micro", "--n_per_class", "4", "1", "--global_batch", "8", "--epochs", "2",
            "--log_every", "1", "--eval", "none"]


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# 1. Non-finite weights never replace a good checkpoint
# ----------------------------------------------------------------------------------------------------------
class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = create_vit("vit_micro", depth=1)
        self.head = nn.Linear(64, 1)

    def forward(self, images):
        return self.head(self.encoder.forward_features(images)[:, 0]).pow(2).mean()


def test_a_diverged_update_with_a_finite_loss_does_not_overwrite_the_good_checkpoint(tmp_path):
    """The last update of epoch 2 makes the weights non-finite while its loss is still finite; the epoch-end save
    must refuse them and say that the epoch-1 checkpoint is kept (it once wrote the NaN weights over it)."""
    args = config.parse_args("tiny", {"tiny": dict(epochs=3, global_batch=8, blr=1e-3, warmup_epochs=0)}, None,
                             ["--output_dir", str(tmp_path), "--device", "cpu", "--log_every", "100"])
    dist = training.setup(args)
    dataset = data.build_dataset(None, "train", data.eval_transform(32), n_per_class=4)
    loader = data.build_loader(dataset, args.batch_size, dist, train=True)
    model = Regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    run = training.Trainer(args, model, optimizer, loader, dist, encoder=model.encoder)
    with pytest.raises(SystemExit, match=r"weights are not finite after step 10 .* the last good checkpoint "
                                         r".*checkpoint-last.pth \(step 5\) is kept"):
        for images, _, _ in run:
            with run.micro_batch():
                loss = model(images)
            if run.step(loss) and run.global_step == 10:           # the last step of epoch 2 (5 steps per epoch)
                with torch.no_grad():
                    model.head.weight.fill_(float("inf"))           # as a diverging LR does, after a finite loss
    kept = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert kept["step"] == 5
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_an_infinite_learning_rate_is_refused_before_training():
    with pytest.raises(SystemExit, match="--lr inf must be a finite number"):
        mae.get_args(["--model", "vit_micro", "--lr", "inf"])


# ----------------------------------------------------------------------------------------------------------
# 2. A run directory belongs to one live run
# ----------------------------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
sys.path.insert(0, {repo!r})
from common import trainer
trainer.lock_run_dir({run_dir!r})
print("locked", flush=True)
time.sleep(120)
"""


def test_a_live_run_holds_its_directory_and_a_killed_one_releases_it(tmp_path):
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(repo=REPO, run_dir=run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"--output_dir {run_dir} is in use by a live run \(pid {holder.pid}"):
            mae.main(TINY_MAE + ["--output_dir", run_dir])
        assert not os.path.exists(os.path.join(run_dir, "log.jsonl"))      # nothing of the second run was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    mae.main(TINY_MAE + ["--output_dir", run_dir, "--max_steps", "1"])    # the killed run left no stale lock
    assert len(read_log(run_dir)) == 1


# ----------------------------------------------------------------------------------------------------------
# 3, 4. --resume of a file that is not this run's
# ----------------------------------------------------------------------------------------------------------
def test_mim_refiner_resumes_the_file_it_is_given(tmp_path, micro_checkpoint, capsys):
    micro_checkpoint(tmp_path / "mae.pth")
    common = ["--model", "vit_micro", "--n_per_class", "4", "1", "--global_batch", "8", "--queue_size", "16",
              "--head_blocks", "final,2", "--epochs", "1", "--eval", "none", "--ckpt", str(tmp_path / "mae.pth")]
    mim_refiner.main(common + ["--output_dir", str(tmp_path / "a"), "--max_steps", "2"])     # init stopped at 2
    with pytest.raises(SystemExit, match="--resume .*missing.pth does not exist"):
        mim_refiner.main(common + ["--output_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "missing.pth")])
    mae.main(TINY_MAE + ["--output_dir", str(tmp_path / "mae_run"), "--max_steps", "1"])
    with pytest.raises(SystemExit, match="was written by mae.py, not mim_refiner.py"):
        mim_refiner.main(common + ["--output_dir", str(tmp_path / "b"),
                                   "--resume", str(tmp_path / "mae_run" / "checkpoint-last.pth")])
    capsys.readouterr()
    mim_refiner.main(common + ["--output_dir", str(tmp_path / "b"),
                               "--resume", str(tmp_path / "a" / "init" / "checkpoint-last.pth")])
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2 (epoch 0)" in out               # the init stage continued
    assert torch.load(tmp_path / "b" / "checkpoint-last.pth", weights_only=True)["step"] == 5   # then refined


def bad_files(tmp_path):
    """Files that are not a checkpoint this run can continue from, by kind."""
    good = tmp_path / "mae_run" / "checkpoint-last.pth"
    mae.main(TINY_MAE + ["--output_dir", str(good.parent), "--max_steps", "1"])
    files = {"empty": b"", "random bytes": os.urandom(3000), "truncated": good.read_bytes()[:5000]}
    for name, content in files.items():
        (tmp_path / f"{name}.pth").write_bytes(content)
    torch.save({"model": {}}, tmp_path / "weights only.pth")
    paths = {name: tmp_path / f"{name}.pth" for name in [*files, "weights only"]}
    paths["good"] = good
    return paths


def test_resume_from_a_bad_file_is_one_sentence(tmp_path):
    paths = bad_files(tmp_path)
    expected = {"empty": "cannot be read as a checkpoint", "random bytes": "cannot be read as a checkpoint",
                "truncated": "cannot be read as a checkpoint", "weights only": "not a training checkpoint"}
    for name, message in expected.items():
        with pytest.raises(SystemExit, match=message):
            mae.main(TINY_MAE + ["--output_dir", str(tmp_path / name), "--resume", str(paths[name])])
    with pytest.raises(SystemExit, match="was written by mae.py, not mixmim.py"):              # another script's
        mixmim.main(["--model", "vit_micro", "--n_per_class", "4", "1", "--global_batch", "8",
                     "--output_dir", str(tmp_path / "mix"), "--resume", str(paths["good"])])
    with pytest.raises(SystemExit, match="was written for --model vit_micro, this run is --model vit_mini"):
        mae.main(["--model", "vit_mini", "--n_per_class", "4", "1", "--global_batch", "8", "--output_dir",
                  str(tmp_path / "mini"), "--resume", str(paths["good"])])                    # another size's
    with pytest.raises(SystemExit, match="does not fit this run's model"):                      # other flags
        mae.main(TINY_MAE + ["--decoder", "16", "1", "2", "--output_dir", str(tmp_path / "dec"),
                             "--resume", str(paths["good"])])


# ----------------------------------------------------------------------------------------------------------
# 5. --ckpt of a bad file
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [mae, mae_ct])
def test_start_weights_from_a_bad_file_are_one_sentence(tmp_path, script, micro_checkpoint):
    """Missing, empty, truncated, random bytes, another size, a renamed key, a wrong shape, an unreachable URL: one
    sentence that names the file (a SystemExit, never a traceback of another exception)."""
    vit = micro_checkpoint(tmp_path / "good.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(os.urandom(3000))
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:4000])
    torch.save({"model": create_vit("vit_mini").state_dict()}, tmp_path / "other_size.pth")
    renamed = {("blocks.0.attention.qkv.weight" if k == "blocks.0.attn.qkv.weight" else k): v
               for k, v in vit.state_dict().items()}
    torch.save({"model": renamed}, tmp_path / "renamed.pth")
    reshaped = dict(vit.state_dict(), **{"blocks.0.mlp.fc1.weight": torch.zeros(100, 64)})
    torch.save({"model": reshaped}, tmp_path / "reshaped.pth")
    cases = {"missing.pth": "does not exist", "empty.pth": "could not be read", "random.pth": "could not be read",
             "truncated.pth": "could not be read", "other_size.pth": "width|shape|does not fit", "renamed.pth": "missing 1 keys",
             "reshaped.pth": "has shape", "http://127.0.0.1:9/mae.pth": "could not download"}
    for name, message in cases.items():
        path = name if name.startswith("http") else str(tmp_path / name)
        with pytest.raises(SystemExit, match=message):
            script.main(["--model", "vit_micro", "--ckpt", path, "--output_dir", str(tmp_path / "run")])


# ----------------------------------------------------------------------------------------------------------
# 6. An unlabelled folder trains and ends cleanly
# ----------------------------------------------------------------------------------------------------------
def test_a_flat_unlabelled_folder_trains_and_exits_cleanly(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(16):
        Image.new("RGB", (40, 40), (15 * i, 100, 200 - 10 * i)).save(folder / f"{i}.png")
    mae.main(["--model", "vit_micro", "--data", str(folder), "--global_batch", "8", "--epochs", "1",
              "--output_dir", str(tmp_path / "run")])                     # default --eval: returns, no SystemExit
    assert "has no class labels: no end-of-run evaluation" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint-last.pth").is_file()


# ----------------------------------------------------------------------------------------------------------
# 7. Flag values
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [mae, mixmim, mimco, mae_ct, mim_refiner])
@pytest.mark.parametrize("flags,message", [
    (["--lr", "nan"], "--lr nan must be a finite number"),
    (["--blr", "-1"], "--blr -1.0 must be greater than 0.0"),
    (["--num_workers", "-1"], "--num_workers -1 must be at least 0"),
    (["--img_size", "30"], "--img_size 30 is not a multiple of the vit_micro patch size 4"),
    (["--log_every", "0"], "--log_every 0 must be at least 1"),
    (["--max_steps", "-1"], "--max_steps -1 must be at least 1"),
    (["--warmup_epochs", "-1"], "--warmup_epochs -1.0 must be at least 0.0"),
    (["--eval", "bogus"], "--eval: evaluation protocol 'bogus' is not one of"),
])
def test_bad_flag_values_are_refused_before_anything_runs(script, flags, message):
    with pytest.raises(SystemExit, match=message):
        script.get_args(["--model", "vit_micro", *flags])


def test_method_flags_are_checked_too():
    with pytest.raises(SystemExit, match=r"--mask_ratio 0.0 must be in \(0, 1\)"):
        mae.get_args(["--model", "vit_micro", "--mask_ratio", "0"])
    with pytest.raises(SystemExit, match="--protocol: evaluation protocol 'bogus' is not one of"):
        evaluation.get_args(["--ckpt", "x.pth", "--protocol", "bogus"])


def test_triton_kernels_without_cuda_are_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="--kernels triton: kernel backend 'triton' needs CUDA tensors"):
        mae.main(TINY_MAE + ["--kernels", "triton", "--output_dir", str(tmp_path)])


# ----------------------------------------------------------------------------------------------------------
# 9. Unwritable directories, a full disk
# ----------------------------------------------------------------------------------------------------------
def test_an_unwritable_output_dir_is_one_sentence(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for run_dir in (tmp_path / "file" / "run", "/proc/mim_run"):
        with pytest.raises(SystemExit, match=f"--output_dir .* cannot be written"):
            mae.main(TINY_MAE + ["--output_dir", str(run_dir)])


def test_an_unwritable_eval_out_dir_is_one_sentence(tmp_path, micro_checkpoint):
    micro_checkpoint(tmp_path / "c.pth")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match="--out_dir .* cannot be written"):
        evaluation.main(["--ckpt", str(tmp_path / "c.pth"), "--out_dir", str(tmp_path / "file" / "out")])


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A real refused write, not a mocked one: a file-size limit (RLIMIT_FSIZE) below the checkpoint's size makes
    the file system cut torch.save's write short, as a disk that fills up mid-write does (torch reports both as
    'unexpected pos'); the run must stop with one sentence and the reason, and keep the previous checkpoint."""
    resource = pytest.importorskip("resource")
    mae.main(TINY_MAE + ["--output_dir", str(tmp_path), "--max_steps", "2"])
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # the write fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, limits[1]))
    try:
        with pytest.raises(SystemExit, match=r"could not write the checkpoint .*\(File too large\); the previous "
                                             r"one is kept"):
            mae.main(TINY_MAE + ["--output_dir", str(tmp_path), "--max_steps", "4", "--resume", "auto"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp_")]


# ----------------------------------------------------------------------------------------------------------
# 10. After a kill: the log holds each step once, no temporary file stays, files are ordinary
# ----------------------------------------------------------------------------------------------------------
def test_a_resumed_run_logs_each_step_once_and_cleans_up_after_a_killed_save(tmp_path):
    mae.main(TINY_MAE + ["--output_dir", str(tmp_path / "straight")])
    run = tmp_path / "killed"
    mae.main(TINY_MAE + ["--output_dir", str(run), "--max_steps", "3"])
    with open(run / "log.jsonl", "a") as f:          # steps 4 and 5 were logged, then a SIGKILL before any save
        for step in (4, 5):
            f.write(json.dumps({"step": step, "epoch": 1.0, "loss": 9.9}) + "\n")
    (run / ".tmp_kill9.pth").write_bytes(b"half a checkpoint")       # a save killed half-way
    mae.main(TINY_MAE + ["--output_dir", str(run), "--resume", "auto"])
    assert [r["step"] for r in read_log(run)] == list(range(1, 11))
    assert [r["loss"] for r in read_log(run)] == [r["loss"] for r in read_log(tmp_path / "straight")]
    assert not (run / ".tmp_kill9.pth").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(run / "checkpoint-last.pth").st_mode) == 0o666 & ~umask


def test_the_checkpoint_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(checkpoints.os, "fsync", lambda fd: events.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(checkpoints.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    checkpoints.save_checkpoint(str(tmp_path / "c.pth"), {"x": torch.ones(3)})
    assert events[:2] == ["fsync", "replace"] and events.count("fsync") == 2   # the file, then its directory
