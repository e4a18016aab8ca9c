"""Training pieces: losses, optimiser and schedule, EMA, checkpoints, one step per objective, bit-exact resume."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from dera_fast.train import checkpoint as ckpt
from dera_fast.train.losses import (LeCam, PerceptualLoss, TransformerDiscriminator, build_perceptual,
                                    d_loss_ns_smooth, g_loss_ns, l1_loss)
from dera_fast.train.optim import EMA, make_adam, param_groups, schedule_mult, set_lr


# ------------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_perceptual_loads_torchvision_keys_and_lpips_heads(tmp_path, net):
    ref = PerceptualLoss(net)
    torch.manual_seed(1)
    feats = {f"features.{k}": torch.randn_like(v) * 0.05 for k, v in ref.features.state_dict().items()}
    feats["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision file also has the classifier
    save_file(feats, tmp_path / "backbone.safetensors")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, h.numel(), 1, 1) for i, h in enumerate(ref.heads)}
    save_file(heads, tmp_path / "heads.safetensors")
    m = PerceptualLoss.from_weights(tmp_path / "backbone.safetensors", net, tmp_path / "heads.safetensors")
    assert torch.equal(m.features[0].weight, feats["features.0.weight"])
    assert torch.equal(m.heads[2], heads["lin2.model.1.weight"].flatten())
    x = torch.rand(1, 3, 2, 64, 64)
    y = torch.rand(1, 3, 2, 64, 64, requires_grad=True)
    d = m(x, y)
    d.backward()
    assert d > 0 and float(m(x, x)) == 0.0
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in m.parameters())


def test_perceptual_bad_weights_and_off_notice(tmp_path, caplog):
    save_file({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="torchvision vgg"):
        PerceptualLoss.from_weights(tmp_path / "bad.safetensors", "vgg")
    with caplog.at_level("WARNING", logger="dera_fast.train"):
        assert build_perceptual(None) is None
    assert "perceptual loss OFF" in caplog.text


def test_gan_losses():
    torch.manual_seed(0)
    big = torch.full((4096, 1), 50.0)
    # BCE(L, t) = softplus(L) - t*L: with real targets in [0.7, 1] and fake in [0, 0.3], each half lies in
    # [0, 0.3 L] and is > 0 on average (the label noise).
    d = d_loss_ns_smooth(big, -big)
    assert 0 < float(d) <= 2 * 0.3 * 50 + 1e-3
    assert float(d) == pytest.approx(2 * 50 * 0.15 * math.sqrt(2 / math.pi), rel=0.05)  # E|N(0, .15²)| * L
    fake = torch.randn(8, 1)
    assert torch.allclose(g_loss_ns(fake), -torch.nn.functional.logsigmoid(fake).mean())
    assert l1_loss(torch.zeros(2, 3), torch.ones(2, 3)) == 1


def test_lecam_uses_ema_anchors():
    lc = LeCam(decay=0.9)
    real, fake = torch.tensor([2.0]), torch.tensor([-1.0])
    reg = lc(real, fake)  # anchors start at 0: relu(2 - 0)^2 + relu(0 + 1)^2
    assert float(reg) == pytest.approx(5.0)
    assert float(lc.ema_real) == pytest.approx(0.2) and float(lc.ema_fake) == pytest.approx(-0.1)
    reg2 = lc(real, fake)
    assert float(reg2) == pytest.approx((2 + 0.1) ** 2 + (0.2 + 1) ** 2)


def test_discriminator_shape():
    d = TransformerDiscriminator(frames=8, size=32, patch_t=4, patch=8, dim=32, depth=2, heads=2)
    assert d(torch.rand(3, 3, 8, 32, 32)).shape == (3, 1)
    with pytest.raises(ValueError, match="divisible"):
        TransformerDiscriminator(frames=6, size=32, patch_t=4, patch=8, dim=32, depth=1, heads=2)


# --------------------------------------------------------------------------------------------- optimisation
def test_prior_lr_multiplier_persists():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = make_adam(param_groups([("prior", a.parameters(), 50.0), ("rest", b.parameters(), 1.0)]), 1e-4)
    assert opt.defaults["betas"] == (0.5, 0.9)
    for step in (0, 1, 7, 100, 1000):
        mult = schedule_mult(step, total_steps=1000, warmup_steps=10)
        set_lr(opt, 1e-4, mult)
        prior, rest = opt.param_groups
        assert prior["lr"] == pytest.approx(50 * rest["lr"]) and rest["lr"] == pytest.approx(1e-4 * mult)


def test_schedule_shape():
    f = lambda s: schedule_mult(s, total_steps=110, warmup_steps=10, min_lr_mult=0.01)  # noqa: E731
    assert f(0) == pytest.approx(0.01) and f(10) == pytest.approx(1.0) and f(110) == pytest.approx(0.01)
    assert f(5) == pytest.approx(0.505) and f(60) == pytest.approx(0.505)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_ema():
    m = torch.nn.Linear(2, 1)
    ema = EMA(m, decay=0.5)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], w0 + 1.0)
    m2 = torch.nn.Linear(2, 1)
    ema.copy_to(m2)
    assert torch.allclose(m2.weight, w0 + 1.0)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_state_flatten_roundtrip():
    state = {"a": (1, 2.5, "x", None, True), 3: [torch.arange(3), {"b": torch.ones(2, dtype=torch.uint8)}]}
    skel, tensors = ckpt.flatten_state(state)
    json.dumps(skel)  # the skeleton is plain JSON
    back = ckpt.unflatten_state(json.loads(json.dumps(skel)), tensors)
    assert back["a"] == state["a"] and torch.equal(back[3][0], state[3][0])
    assert torch.equal(back[3][1]["b"], state[3][1]["b"])
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.flatten_state({"f": lambda: 0})


def test_checkpoint_atomic_keep_last(tmp_path):
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, weights={"model": lin.state_dict()}, config={"k": 1},
                             state={"optimizer": opt.state_dict(), "rng": ckpt.rng_state()}, keep_last=2)
    dirs = ckpt.list_checkpoints(tmp_path)
    assert [d.name for d in dirs] == ["step_00000003", "step_00000004"]
    assert ckpt.latest_checkpoint(tmp_path) == dirs[-1]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert {p.suffix for p in dirs[-1].iterdir()} == {".safetensors", ".json"}  # no pickle anywhere
    step, weights, config, state = ckpt.load_checkpoint(dirs[-1])
    assert step == 4 and config == {"k": 1} and torch.equal(weights["model"]["weight"], lin.weight)
    opt2 = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    sd, cfg = ckpt.load_weights(dirs[-1] / "model.safetensors")
    assert cfg == {"k": 1} and set(sd) == {"weight", "bias"}


def test_damaged_checkpoints_are_skipped(tmp_path, caplog):
    lin = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, weights={"model": lin.state_dict()}, config={}, state={"s": step},
                             keep_last=0, model={"model_type": "x", "architecture": {"dim": 2}})
    dirs = ckpt.list_checkpoints(tmp_path)
    assert all(ckpt.verify_checkpoint(d) == [] for d in dirs)
    w = dirs[2] / "model.safetensors"  # same size, one byte flipped: only the digest catches it
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    (dirs[1] / "state.json").unlink()
    with caplog.at_level("WARNING", logger="dera_fast.train"):
        assert ckpt.select_checkpoint(tmp_path) == dirs[0]
    assert "sha256" in caplog.text and "state.json is missing" in caplog.text
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert (tmp_path / "checkpoints" / "step_00000003.damaged").is_dir()
    with pytest.raises(ValueError, match="architecture changed .*dim: 2 -> 3"):
        ckpt.check_same_model(dirs[0], {"model_type": "x", "architecture": {"dim": 3}})
    (dirs[0] / "manifest.json").unlink()  # older checkpoints without a manifest are checked by reading them
    assert ckpt.verify_checkpoint(dirs[0]) == []
    (dirs[0] / "state.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no intact checkpoint"):
        ckpt.select_checkpoint(tmp_path)


def test_metrics_log_keeps_each_step_once(tmp_path):
    from dera_fast.train.loop import MetricsLog

    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3, 4):
        log.write(step, {"loss": float(step)})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a record cut short by a kill
    again = MetricsLog(tmp_path / "m.jsonl")
    again.rewind(2)  # resumed at step 2: steps 3, 4 and the broken line go
    again.write(2, {"schedule_steps": 10})  # the same step again: merged into one record
    again.write(3, {"loss": 30.0})
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[1]["loss"] == 2.0 and recs[1]["schedule_steps"] == 10 and recs[2]["loss"] == 30.0


def test_checkpoints_by_wall_time(tmp_path):
    from dera_fast.train.tokenizer import TokenizerTrainer

    tr = TokenizerTrainer(_tok_cfg(steps=4, ckpt_every=0, ckpt_minutes=1e-9, log_every=2), tmp_path, progress=False)
    tr.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    from dera_fast.train.generator import GeneratorTrainConfig
    from dera_fast.train.tokenizer import TokenizerTrainConfig

    for cls in (TokenizerTrainConfig, GeneratorTrainConfig):  # every preset checkpoints periodically by default
        for name in cls.presets():
            cfg = cls.from_name(name, **({"tokens": "t"} if cls is GeneratorTrainConfig else {}))
            assert cfg.ckpt_every > 0 and cfg.ckpt_minutes > 0, (cls.__name__, name)


def test_batch_stream_shards_resumes_and_workers_agree():
    from dera_fast.train.distributed import DistInfo
    from dera_fast.train.loop import BatchStream

    data = [{"i": i} for i in range(10)]
    ranks = [BatchStream(data, 2, DistInfo(r, 2, r, torch.device("cpu")), seed=3) for r in (0, 1)]
    first = [[next(s)["i"].tolist() for _ in range(2)] for s in ranks]  # 10 items / 2 ranks / batch 2: 2 batches
    seen = sum(first[0] + first[1], [])
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 8  # disjoint shards, ragged tail dropped
    one = BatchStream(data, 3, DistInfo(0, 1, 0, torch.device("cpu")), seed=1)
    ref = [next(one)["i"].tolist() for _ in range(7)]  # crosses two epoch boundaries
    again = BatchStream(data, 3, DistInfo(0, 1, 0, torch.device("cpu")), seed=1)
    [next(again) for _ in range(4)]
    state = again.state_dict()
    resumed = BatchStream(data, 3, DistInfo(0, 1, 0, torch.device("cpu")), seed=1, num_workers=1)
    resumed.load_state_dict(state)
    assert [next(resumed)["i"].tolist() for _ in range(3)] == ref[4:]


# ------------------------------------------------------------------------------------------------- trainers
def _tok_cfg(**kw):
    from dera_fast.train.tokenizer import TokenizerTrainConfig

    # prior_weight: the tiny preset's recipe has no AR prior; these tests exercise LARP's full objective
    base = dict(steps=4, batch_size=2, num_clips=4, gan_start=0, d_update_every=2, log_every=2, seed=0,
                prior_weight=0.06)
    return TokenizerTrainConfig.from_name("tiny", **{**base, **kw})


@pytest.mark.parametrize("kw", [
    pytest.param(dict(arch="larp"), id="larp-gan-prior"),
    pytest.param(dict(arch="dera", sacp="loss_reweight"), id="dera-sacp-reweight"),
    pytest.param(dict(arch="dera", sacp="project", prior_weight=0.0), id="dera-sacp-project-noprior"),
    pytest.param(dict(arch="dera", sacp="off", gan_weight=0.0, prior_lr_mult=50.0), id="dera-nosacp-nogan"),
])
def test_tokenizer_one_step_each_objective(tmp_path, kw):
    from dera_fast.train.tokenizer import TokenizerTrainer

    tr = TokenizerTrainer(_tok_cfg(**kw), tmp_path, progress=False)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    logs = tr.train_step(next(tr.stream))
    assert all(math.isfinite(v) for v in logs.values())
    assert ("d_loss" in logs) == (kw.get("gan_weight", 1) > 0)
    assert ("loss_prior" in logs) == (kw.get("prior_weight", 1) > 0)
    assert ("align_a" in logs) == (kw["arch"] == "dera")
    assert ("sacp_wa" in logs) == (kw.get("sacp") == "loss_reweight")
    changed = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed)
    if kw["arch"] == "dera":
        assert any(k.startswith("align_head_") for k in changed)
    if kw.get("prior_lr_mult"):
        assert tr.opt.param_groups[0]["name"] == "prior" and tr.opt.param_groups[0]["lr"] == pytest.approx(
            50 * tr.opt.param_groups[1]["lr"])


def test_discriminator_every_k_steps(tmp_path):
    from dera_fast.train.tokenizer import TokenizerTrainer

    tr = TokenizerTrainer(_tok_cfg(arch="larp", d_update_every=2, gan_start=1), tmp_path, progress=False)
    batch = next(tr.stream)
    has_d = ["d_loss" in tr.train_step(batch) for _ in range(5)]  # steps 0..4; GAN from step 1
    assert has_d == [False, False, True, False, True]


@pytest.mark.parametrize("extra", [pytest.param({}, id="tiny"),
                                   pytest.param(dict(vq_restart_after=1), id="restarts-every-step")])
def test_tokenizer_resume_is_bit_exact(tmp_path, extra):
    from dera_fast.train.tokenizer import TokenizerTrainer

    cfg = dict(steps=6, ckpt_every=3, ema_decay=0.9, **extra)
    full = TokenizerTrainer(_tok_cfg(**cfg), tmp_path / "a", progress=False)
    seen = {}
    full.train(on_log=lambda s, v: seen.setdefault(s, v["loss"]))
    part = TokenizerTrainer(_tok_cfg(**cfg), tmp_path / "b", progress=False)
    assert part.resume(tmp_path / "a" / "checkpoints" / "step_00000003")
    again = {}
    part.train(on_log=lambda s, v: again.setdefault(s, v["loss"]))
    assert again[6] == seen[6]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, part.model.state_dict()[k]), k
    for k, v in full.model.quantizer.health_state_dict().items():  # usage EMA, idle steps: restarts resume exactly
        assert torch.equal(v, part.model.quantizer.health_state_dict()[k]), k
    assert (tmp_path / "a" / "model" / "model.safetensors").is_file()
    assert len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) == 3


def test_generator_train_and_resume_bit_exact(tmp_path):
    from dera_fast.train.generator import GeneratorTrainConfig, GeneratorTrainer
    from dera_fast.train.tokens import save_tokens

    tokens = torch.randint(0, 64, (12, 16))
    save_tokens(tmp_path / "tok.safetensors", tokens, codebook_size=64, labels=torch.arange(12) % 3)
    mk = lambda: GeneratorTrainConfig.from_name("tiny", tokens=str(tmp_path / "tok.safetensors"), steps=6,  # noqa
                                                 batch_size=4, ckpt_every=3, log_every=3)
    full = GeneratorTrainer(mk(), tmp_path / "a", progress=False)
    assert full.model.config.num_classes == 3 and full.model.config.vocab_size == 64
    last = full.train()
    part = GeneratorTrainer(mk(), tmp_path / "b", progress=False)
    part.resume(tmp_path / "a" / "checkpoints" / "step_00000003")
    assert part.train()["loss"] == last["loss"]
    from dera_fast.models.ar import ARGenerator

    ARGenerator.from_pretrained(tmp_path / "a" / "model")


def test_recipes_fill_unset_fields_and_explicit_values_win():
    from dera_fast.train.tokenizer import RECIPES, TokenizerTrainConfig

    larp = TokenizerTrainConfig.from_name("tiny", recipe="larp")
    assert (larp.lr, larp.betas, larp.vq_kmeans_init, larp.vq_restart_after) == (1e-4, (0.5, 0.9), False, 0)
    fast = TokenizerTrainConfig.from_name("tiny")
    assert fast.recipe == "fast" and all(getattr(fast, k) == v for k, v in RECIPES["fast"].items())
    assert TokenizerTrainConfig.from_name("tiny", recipe="larp", lr=3e-4).lr == 3e-4
    assert TokenizerTrainConfig().recipe == "larp" and TokenizerTrainConfig().lr == 1e-4  # the dataclass: LARP's
    # a saved config reloads to the same values whatever the recipe table says later
    assert TokenizerTrainConfig.from_dict(fast.to_dict()) == fast
    with pytest.raises(ValueError, match="recipe must be one of"):
        TokenizerTrainConfig(recipe="nope")


def test_init_from_a_saved_tokenizer_keeps_its_codebook(tmp_path):
    from dera_fast.train.tokenizer import TokenizerTrainer

    first = TokenizerTrainer(_tok_cfg(steps=2), tmp_path / "a", progress=False)
    first.train()
    tuned = TokenizerTrainer(_tok_cfg(init_from=str(tmp_path / "a" / "model")), tmp_path / "b", progress=False)
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, tuned.model.state_dict()[k]), k
    assert not bool(tuned.model.quantizer.kmeans_pending)  # no k-means over a trained codebook
    with pytest.raises(ValueError, match="larp"):
        TokenizerTrainer(_tok_cfg(arch="larp", init_from=str(tmp_path / "a" / "model")), tmp_path / "c",
                         progress=False)


def test_training_config_errors(tmp_path):
    from dera_fast.train.generator import GeneratorTrainConfig, GeneratorTrainer
    from dera_fast.train.tokenizer import TokenizerTrainConfig

    with pytest.raises(ValueError, match="unknown tokenizer training preset"):
        TokenizerTrainConfig.from_name("nope")
    with pytest.raises(ValueError, match="unknown tokenizer training fields"):
        TokenizerTrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="sacp"):
        TokenizerTrainConfig(sacp="pcgrad")
    with pytest.raises(ValueError, match="tokens"):
        GeneratorTrainer(GeneratorTrainConfig(), tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors token file"):
        GeneratorTrainer(GeneratorTrainConfig(tokens=str(tmp_path / "x.safetensors")), tmp_path)
