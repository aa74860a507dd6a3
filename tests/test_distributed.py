"""`flashback train` under torchrun: two CPU processes (gloo) train what one process trains with the same global
batch, and a run whose rank is killed resumes from its checkpoint to the same adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from flashback.cli import main
from flashback.distributed import World
from flashback.engines.torch import load_model

from .test_train import copy_task, write_data

STEPS = 6


def _args(model, data, out, *extra):
    return [
        "train", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet",
        "--target-modules", "q_proj,k_proj,v_proj,o_proj", "--dropout", "0", "--lr", "2e-3", "--warmup-steps", "2",
        "--max-steps", str(STEPS), "--eval-every", "3", "--max-val-segments", "4", "--autocast", "none", *extra,
    ]  # fmt: skip


def _torchrun(args, log, timeout=100):
    """Two gloo processes on this machine, one thread each; the launcher's output goes to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flashback"]
    with open(log, "w") as out:
        return subprocess.Popen([*cmd, *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _losses(folder):
    card = json.loads((folder / "flashback.json").read_text())
    return [h["loss"] for h in card["history"]], [h["val_loss"] for h in card["history"] if "val_loss" in h], card


@pytest.fixture(scope="module")
def copy_data(tiny_model_dir, tmp_path_factory):
    lm = load_model(str(tiny_model_dir), markers=True)
    return write_data(tmp_path_factory.mktemp("dist") / "data", lm, copy_task(24, 0), copy_task(4, 1))


def test_share_splits_a_step_between_ranks():
    step = list(range(6))
    assert [World(r, 3).share(step) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert World().share(step) == step and World().sum([1.5, 2], torch.device("cpu")) == [1.5, 2]


def test_two_processes_train_the_adapter_one_process_trains(tiny_model_dir, copy_data, tmp_path, capsys):
    assert main(_args(tiny_model_dir, copy_data, tmp_path / "one", "--batch-size", "4")) == 0
    capsys.readouterr()
    proc = _torchrun(_args(tiny_model_dir, copy_data, tmp_path / "two", "--batch-size", "2"), tmp_path / "two.log")
    assert proc.wait(timeout=110) == 0, (tmp_path / "two.log").read_text()[-3000:]
    log = (tmp_path / "two.log").read_text()
    assert log.count('"processes": 2') == 1, log[-3000:]  # rank 0 alone reports

    loss_one, val_one, card_one = _losses(tmp_path / "one")
    loss_two, val_two, card_two = _losses(tmp_path / "two")
    assert card_one["batch"] == {"world_size": 1, "global_batch": 4, "per_rank": 4}
    assert card_two["batch"] == {"world_size": 2, "global_batch": 4, "per_rank": 2}
    assert card_one["target_tokens"] == card_two["target_tokens"] == STEPS * 4 * 4 * 6
    assert card_one["tokens_seen"] == card_two["tokens_seen"]
    assert len(loss_two) == STEPS and len(val_two) == 2
    assert loss_two == pytest.approx(loss_one, rel=1e-4) and val_two == pytest.approx(val_one, rel=1e-4)
    assert loss_one[-1] < loss_one[0]  # it learned something, so equal weights are not equal initial ones
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not (tmp_path / "two.checkpoint").exists()


def test_a_killed_rank_resumes_from_the_checkpoint(tiny_model_dir, copy_data, tmp_path, capsys):
    args = _args(tiny_model_dir, copy_data, tmp_path / "two", "--batch-size", "2", "--save-every", "2")
    ckpt = tmp_path / "two.checkpoint" / "state.pt"
    proc = _torchrun(args, tmp_path / "killed.log")
    deadline = time.monotonic() + 90
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[-1]), signal.SIGKILL)  # one rank dies mid-run; the launcher stops the other
    assert proc.wait(timeout=60) != 0
    assert not (tmp_path / "two").exists()

    resumed = _torchrun([*args, "--resume"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=110) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resumed from step" in (tmp_path / "resumed.log").read_text()
    assert main(_args(tiny_model_dir, copy_data, tmp_path / "one", "--batch-size", "4")) == 0
    loss_one, _, _ = _losses(tmp_path / "one")
    loss_two, _, card = _losses(tmp_path / "two")
    assert card["steps"] == STEPS and [h["step"] for h in card["history"]] == list(range(1, STEPS + 1))
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resume_with_another_global_batch_is_refused(tiny_model_dir, copy_data, tmp_path, capsys):
    import flashback.train as train_mod

    args = _args(tiny_model_dir, copy_data, tmp_path / "a", "--batch-size", "2", "--save-every", "2")
    original = train_mod._save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(*a, **k):
        original(*a, **k)
        raise Stop

    train_mod._save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            main(args)
    finally:
        train_mod._save_checkpoint = original
    code = main([*args[:-4], "--batch-size", "4", "--save-every", "2", "--resume"])
    assert code == 2 and "resume with the same global batch" in capsys.readouterr().err


def test_gradient_checkpointing_trains_the_same_adapter(tiny_model_dir, copy_data, tmp_path, capsys):
    assert main(_args(tiny_model_dir, copy_data, tmp_path / "plain", "--batch-size", "2")) == 0
    checkpointed = _args(tiny_model_dir, copy_data, tmp_path / "ckpt", "--batch-size", "2", "--gradient-checkpointing")
    assert main(checkpointed) == 0
    capsys.readouterr()
    plain, ckpt = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert ckpt[2]["settings"]["gradient_checkpointing"] and not plain[2]["settings"]["gradient_checkpointing"]
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-5)
    for name, value in _weights(tmp_path / "plain").items():
        torch.testing.assert_close(_weights(tmp_path / "ckpt")[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_replays_the_rows_but_never_the_prefix(tiny_model_dir):
    from flashback.config import TrainConfig
    from flashback.train import add_adapter, enable_gradient_checkpointing, pack, target_nll

    calls = []
    for checkpointing in (False, True):
        lm = load_model(str(tiny_model_dir), markers=True)
        if checkpointing:
            enable_gradient_checkpointing(lm.model)
        model = add_adapter(lm, TrainConfig(target_modules=("q_proj", "v_proj"), dropout=0.0, tail=3))
        model.train()
        attention = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
        calls.append(0)
        attention.register_forward_hook(lambda *a: calls.__setitem__(-1, calls[-1] + 1))
        batch = pack(copy_task(1, 0)[0], lm.marker_ids, 3, 0, lm.device)
        target_nll(model, batch, torch.tensor(lm.marker_ids)).mean().backward()
    assert calls == [2, 3]  # prefix and rows; then the rows once more in the backward pass
