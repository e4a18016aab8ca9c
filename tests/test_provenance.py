"""Token provenance: token files and generators record which tokenizer made their tokens (model type, tokens per
clip, codebook size, architecture hash); ``reconstruct`` and ``generate`` refuse another tokenizer's tokens unless
``--ignore-provenance``. The hash covers architecture fields only, so a loss weight does not change identity."""
import json

import pytest
import torch

from dera_fast.cli import main
from dera_fast.models import DeRATokenizer, LARPTokenizer
from dera_fast.models.pretrained import architecture_hash, config_hash
from dera_fast.train.tokens import check_provenance, load_tokens, save_tokens, tokenizer_provenance


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return DeRATokenizer.from_name("tiny").eval(), LARPTokenizer.from_name("tiny").eval()


def test_check_provenance_rules(models):
    dera, larp = models
    rec = tokenizer_provenance(dera)
    assert check_provenance(rec, dera, source="f") == []
    assert "'dera' tokenizer" in check_provenance(rec, larp, source="f")[0]
    # a training-only change (loss weight, prior schedule) keeps the identity; an architecture change does not
    retrained = DeRATokenizer(dera.config.replace(vq_beta=0.5, align_weight_motion=0.2, prior_rounds=1))
    assert check_provenance(rec, retrained, source="f") == []
    wider = DeRATokenizer(dera.config.replace(code_dim=4))
    assert any("another architecture" in p for p in check_provenance(rec, wider, source="f"))
    bigger = DeRATokenizer(dera.config.replace(codebook_size=128))
    assert any("codebook_size=64" in p for p in check_provenance(rec, bigger, source="f"))
    # files from before: the hash of the whole config is still recognised; no record means nothing to compare
    assert check_provenance({"tokenizer_config_hash": config_hash(dera.config.to_dict())}, dera, source="f") == []
    assert check_provenance({}, larp, source="f") == []
    # the tiny LARP and DeRA share one config: the model type is what tells their tokens apart
    assert architecture_hash(dera.config) == architecture_hash(larp.config) and check_provenance(rec, larp, source="f")


def test_reconstruct_and_generate_enforce_provenance(models, tmp_path, capsys):
    from dera_fast.train.generator import GeneratorTrainConfig, GeneratorTrainer

    dera, larp = models
    dera.save_pretrained(tmp_path / "dera")
    larp.save_pretrained(tmp_path / "larp")
    ids = torch.randint(0, 64, (4, 16))
    save_tokens(tmp_path / "t.safetensors", ids, codebook_size=64, labels=torch.tensor([0, 1, 0, 1]),
                meta=tokenizer_provenance(dera))
    assert load_tokens(tmp_path / "t.safetensors")[2]["model_type"] == "dera"
    rec = ["reconstruct", str(tmp_path / "t.safetensors"), str(tmp_path / "r.png"), "--no-progress"]
    assert main(rec + ["--model", str(tmp_path / "larp")]) == 2
    assert "'dera' tokenizer, the model is 'larp'" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()
    assert main(rec + ["--model", str(tmp_path / "larp"), "--ignore-provenance"]) == 0
    assert main(rec + ["--model", str(tmp_path / "dera"), "--overwrite"]) == 0

    cfg = GeneratorTrainConfig.from_name("tiny", tokens=str(tmp_path / "t.safetensors"), steps=1, batch_size=2)
    GeneratorTrainer(cfg, tmp_path / "gen", device="cpu", progress=False).train()
    header = json.loads((tmp_path / "gen" / "model" / "config.json").read_text())
    assert header["tokenizer"] == {"model_type": "dera", "tokens_per_clip": 16, "codebook_size": 64,
                                   "config_hash": architecture_hash(dera.config)}
    gen = ["generate", str(tmp_path / "g.png"), "--model", str(tmp_path / "gen" / "model"), "--class", "1", "--num",
           "1", "--no-progress"]
    assert main(gen + ["--tokenizer", str(tmp_path / "larp")]) == 2
    assert "generator" in capsys.readouterr().err and not (tmp_path / "g.png").exists()
    assert main(gen + ["--tokenizer", str(tmp_path / "larp"), "--ignore-provenance"]) == 0
    assert main(gen + ["--tokenizer", str(tmp_path / "dera"), "--overwrite"]) == 0
