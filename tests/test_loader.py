"""The trainers' BatchStream: persistent workers, the global RNG left alone, the default worker count, and resume
exactness: a run with DataLoader workers, SIGKILLed and resumed, sees the same batches as a run without workers."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dera_fast.data.loader import BatchStream, default_num_workers
from dera_fast.train.distributed import DistInfo

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


class PidItems(torch.utils.data.Dataset):
    """Items that tell which process made them and which epoch the dataset was set to."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": i, "pid": os.getpid(), "epoch": self.epoch}


def test_workers_persist_across_epochs_and_see_the_epoch():
    stream = BatchStream(PidItems(6), 2, CPU, seed=1, num_workers=2)
    assert stream.steps_per_epoch == 3
    batches = [next(stream) for _ in range(9)]  # three epochs
    pids = {int(p) for b in batches for p in b["pid"]}
    assert len(pids) == 2 and os.getpid() not in pids  # the same two workers throughout
    assert [int(b["epoch"][0]) for b in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert stream.state_dict() == {"epoch": 3, "position": 0}
    plain = BatchStream(PidItems(6), 2, CPU, seed=1, num_workers=0)
    assert [b["i"].tolist() for b in batches] == [next(plain)["i"].tolist() for _ in range(9)]


def test_worker_start_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    stream = BatchStream(PidItems(4), 2, CPU, num_workers=2)
    next(stream)
    stream.load_state_dict({"epoch": 0, "position": 1})
    next(stream)  # a second iterator (a resume) as well
    assert torch.equal(torch.get_rng_state(), before)


def test_default_num_workers(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == min(8, cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    assert default_num_workers() == 1
    assert BatchStream(PidItems(4), 2, CPU, num_workers=None).num_workers == 1
    with pytest.raises(ValueError, match="num_workers"):
        BatchStream(PidItems(4), 2, CPU, num_workers=-1)


FORK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from dera_fast.data import VideoFolderDataset
    from dera_fast.data.loader import BatchStream
    from dera_fast.train.distributed import DistInfo

    ds = VideoFolderDataset(sys.argv[1], frames=4, size=16, progress=False)
    ds[0]  # the main process decodes (and resizes) first: its swscale state must not reach the forked workers
    stream = BatchStream(ds, 2, DistInfo(0, 1, 0, torch.device("cpu")), num_workers=2)
    print([tuple(next(stream)["video"].shape) for _ in range(3)])
""")


def test_workers_forked_after_the_main_process_decoded(tmp_path):
    from dera_fast.data import write_video

    for k in range(3):
        write_video(tmp_path / "v" / f"{k}.mp4", torch.randint(0, 255, (10, 24, 40, 3), dtype=torch.uint8), fps=10)
    script = tmp_path / "fork.py"
    script.write_text(FORK_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "v")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})  # a deadlock fails by timeout
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str([(2, 3, 4, 16, 16)] * 3)


SCRIPT = textwrap.dedent("""
    import hashlib, json, os, signal, sys
    import torch
    from dera_fast.data import VideoFolderDataset
    from dera_fast.data.loader import BatchStream
    from dera_fast.train.distributed import DistInfo

    folder, log, state_file, workers, start, stop, save_at, kill_at = sys.argv[1:]
    workers, stop, save_at, kill_at = int(workers), int(stop), int(save_at), int(kill_at)
    ds = VideoFolderDataset(folder, frames=4, size=16, seed=7, progress=False)
    stream = BatchStream(ds, 2, DistInfo(0, 1, 0, torch.device("cpu")), seed=3, num_workers=workers)
    step = 0
    if start == "resume":
        state = json.load(open(state_file))
        stream.load_state_dict(state["data"])
        step = state["step"]
    with open(log, "a") as f:
        while step < stop:
            b = next(stream)
            step += 1
            digest = hashlib.sha256(b["video"].numpy().tobytes()).hexdigest()[:16]
            f.write(json.dumps([step, b["index"].tolist(), digest]) + "\\n")
            f.flush()
            if step == save_at:  # a checkpoint: written atomically, as the trainers do
                with open(state_file + ".tmp", "w") as s:
                    json.dump({"step": step, "data": stream.state_dict()}, s)
                os.replace(state_file + ".tmp", state_file)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: the workers die with the process
""")


@pytest.mark.slow
def test_killed_and_resumed_run_with_workers_sees_the_same_batches(tmp_path):
    from dera_fast.data import write_video

    folder = tmp_path / "videos"
    for k in range(5):  # 5 videos, batch 2: 2 batches per epoch, so 9 steps cross four epoch boundaries
        rng = np.random.default_rng(k)
        frames = torch.from_numpy(rng.integers(0, 255, (12 + 3 * k, 24, 32, 3), dtype=np.uint8))
        write_video(folder / f"c{k}" / f"v{k}.mp4", frames, fps=10)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(log, start, workers, save_at, kill_at):
        return subprocess.run([sys.executable, str(script), str(folder), str(log), str(tmp_path / "state.json"),
                               str(workers), start, "9", str(save_at), str(kill_at)], env=env, timeout=300,
                              capture_output=True, text=True)

    ref = run(tmp_path / "ref.log", "fresh", 0, 0, 0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = run(tmp_path / "run.log", "fresh", 2, 4, 6)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 4
    resumed = run(tmp_path / "resumed.log", "resume", 2, 0, 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lines = {name: [json.loads(x) for x in (tmp_path / f"{name}.log").read_text().splitlines()]
             for name in ("ref", "run", "resumed")}
    assert [x[0] for x in lines["run"]] == [1, 2, 3, 4, 5, 6] and [x[0] for x in lines["resumed"]] == [5, 6, 7, 8, 9]
    assert lines["run"] == lines["ref"][:6]  # with workers = without workers
    assert lines["resumed"] == lines["ref"][4:]  # resumed from the step-4 state: the same batches again
    assert len({x[2] for x in lines["ref"]}) == 9  # random starts and flips: every batch differs
