import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from minimedi.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from minimedi.errors import UserError


def _payload(step):
    return {"model": {"w": torch.full((4, 4), float(step))}, "step": step, "config": {"preset": "tiny"}}


def test_roundtrip(tmp_path):
    path = tmp_path / "diffusion.pt"
    save_checkpoint(path, _payload(3))
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and torch.equal(ckpt["model"]["w"], torch.full((4, 4), 3.0))
    assert os.listdir(tmp_path) == ["diffusion.pt"]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "diffusion.pt"
    save_checkpoint(path, _payload(1))

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # Ctrl-C half-way through writing

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _payload(2))
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["diffusion.pt"]  # the temp file is cleaned up


def test_killed_process_mid_save_keeps_previous_checkpoint(tmp_path):
    """SIGKILL while torch.save is half-way through the new file: the old checkpoint is still whole."""
    path = tmp_path / "diffusion.pt"
    save_checkpoint(path, _payload(1))
    code = ("import sys, time, torch; from minimedi.checkpoint import save_checkpoint\n"
            "real = torch.save\n"
            "def slow_save(obj, f):\n"
            "    f.write(b'PK half of a zip archive'); f.flush()\n"
            "    print('mid-save', flush=True); time.sleep(60)\n"
            "torch.save = slow_save\n"
            "save_checkpoint(sys.argv[1], {'model': {'w': torch.zeros(4)}, 'step': 2})\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"mid-save"  # the new file is half written right now
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name == "diffusion.pt"] == ["diffusion.pt"]


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    torch.save({"model": {}, "step": 1}, tmp_path / "old.pt")  # what minimedi wrote before "format"
    with pytest.raises(UserError, match="another version of minimedi"):
        load_checkpoint(tmp_path / "old.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_bad_files_are_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a truncated real checkpoint
        save_checkpoint(path, _payload(1))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "cannot read checkpoint" in str(e.value) and "\n" not in str(e.value)


def test_foreign_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a minimedi checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "evil.pt")


def test_rng_state_restores_every_generator(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    save_checkpoint(tmp_path / "c.pt", {"model": {}, "rng": rng_state()})
    first = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    second = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])
