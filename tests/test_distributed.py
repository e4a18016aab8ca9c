"""Two-process torchrun (gloo, CPU): DDP tokenizer + discriminator steps with SACP keep every rank's parameters
identical; the FSDP2 generator trains and checkpoints. Run as a script by torchrun (see the test below)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _worker(out: str) -> None:
    import torch.distributed as dist

    import dera_fast
    from dera_fast.train.generator import GeneratorTrainConfig, GeneratorTrainer
    from dera_fast.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer
    from dera_fast.train.tokens import save_tokens

    torch.set_num_threads(1)
    with dera_fast.use_backend("torch"):
        cfg = TokenizerTrainConfig.from_name("tiny", steps=2, batch_size=4, num_clips=8, gan_start=0,
                                             d_update_every=1, log_every=1, seed=0)
        tr = TokenizerTrainer(cfg, Path(out) / "tok", device="cpu", progress=False)
        tr.train()
        rank, world = dist.get_rank(), dist.get_world_size()
        for name, module in (("tokenizer", tr.model), ("discriminator", tr.disc)):
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            assert all(torch.equal(gathered[0], g) for g in gathered), f"{name} parameters diverged"
        assert tr.info.world_size == 2 and tr.stream.batch_size == 2
        if rank == 0:
            save_tokens(Path(out) / "tok.safetensors", torch.randint(0, 64, (8, 16)), codebook_size=64,
                        labels=torch.arange(8) % 2)
        dist.barrier()
        gcfg = GeneratorTrainConfig.from_name("tiny", tokens=str(Path(out) / "tok.safetensors"), steps=2,
                                              batch_size=4, log_every=1)
        gt = GeneratorTrainer(gcfg, Path(out) / "gen", device="cpu", progress=False)
        gt.train()  # ends with a collective full-state checkpoint
    if rank == 0:
        print("DIST-OK")


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    root = str(Path(__file__).resolve().parents[1])  # the worker imports dera_fast from this checkout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "DIST-OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "tok" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "gen" / "model" / "model.safetensors").is_file()
    from dera_fast.models.ar import ARGenerator

    ARGenerator.from_pretrained(tmp_path / "gen" / "model")


if __name__ == "__main__":
    _worker(sys.argv[1])
