"""Two-process torchrun (gloo, CPU): DDP tokenizer + discriminator steps with SACP keep every rank's parameters
identical; the FSDP2 generator trains and checkpoints; both resume bit-exactly on every rank (per-rank RNG state,
the generator's sharded EMA). Run as a script by torchrun (see the test below)."""
import os
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
        _resume_is_bit_exact(out, rank, world)
    if rank == 0:
        print("DIST-OK")


def _resume_is_bit_exact(out: str, rank: int, world: int) -> None:
    """Every rank's RNG is saved and restored: a resumed 2-rank run matches the uninterrupted one on each rank (the
    tokenizer's stochastic VQ and the generator's class dropout draw different numbers per rank); the FSDP2
    generator keeps its (sharded) EMA across the resume."""
    import torch.distributed as dist

    from dera_fast.train import checkpoint as ckpt
    from dera_fast.train.generator import GeneratorTrainConfig, GeneratorTrainer
    from dera_fast.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

    def local(module):
        return torch.cat([(v.to_local() if hasattr(v, "to_local") else v).detach().flatten().float()
                          for v in module.state_dict().values()])

    tok = dict(steps=4, batch_size=4, num_clips=8, gan_start=0, d_update_every=1, log_every=1, ckpt_every=2, seed=0)
    gen = dict(tokens=str(Path(out) / "tok.safetensors"), steps=4, batch_size=4, log_every=1, ckpt_every=2,
               ema_decay=0.9)
    for make, kw, name in ((TokenizerTrainer, TokenizerTrainConfig.from_name("tiny", **tok), "tokr"),
                           (GeneratorTrainer, GeneratorTrainConfig.from_name("tiny", **gen), "genr")):
        full = make(kw, Path(out) / f"{name}_full", device="cpu", progress=False)
        full.train()
        part = make(kw, Path(out) / f"{name}_part", device="cpu", progress=False)
        assert part.resume(Path(out) / f"{name}_full" / "checkpoints" / "step_00000002")
        part.train()
        assert torch.equal(local(full.model), local(part.model)), f"{name}: rank {rank} diverged after resume"
        if name == "genr":
            ema_full = torch.cat([v.to_local().flatten() for v in full.ema.state_dict().values()])
            ema_part = torch.cat([v.to_local().flatten() for v in part.ema.state_dict().values()])
            assert torch.equal(ema_full, ema_part), f"EMA of rank {rank} diverged after resume"
        dist.barrier()
        if rank == 0:
            _, weights, _, state = ckpt.load_checkpoint(Path(out) / f"{name}_full" / "checkpoints" / "step_00000002")
            ranks = state["rng_ranks"]
            assert len(ranks) == world and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
            assert name != "genr" or "ema" in weights


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    root = str(Path(__file__).resolve().parents[1])  # the worker imports dera_fast from this checkout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    from conftest import run_process_group  # here, not at the top: torchrun also runs this file as a script

    res = run_process_group(cmd, env=env, timeout=600)
    assert res.returncode == 0 and "DIST-OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "tok" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "gen" / "model" / "model.safetensors").is_file()
    from dera_fast.models.ar import ARGenerator

    ARGenerator.from_pretrained(tmp_path / "gen" / "model")


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # skip teardown: gloo's process-group destructor can deadlock (tests/conftest.py: exit_worker)
