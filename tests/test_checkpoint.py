"""One checkpoint format for every model (dera_fast.models.pretrained): tokenizers and the generator round-trip
through it, legacy generator folders load, and damaged or foreign folders are refused with a ValueError naming the
file. Also the config field checks behind it (dera_fast._config)."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dera_fast.models import DeRATokenizer, LARPTokenizer, TokenizerConfig
from dera_fast.models import pretrained as P
from dera_fast.models.ar import ARGenerator, GeneratorConfig


def _gen():
    torch.manual_seed(0)
    return ARGenerator(GeneratorConfig.from_name("tiny"))


@pytest.mark.parametrize("kind", ["dera", "larp", "ar_generator"])
def test_one_format_for_every_model(tmp_path, kind):
    model = {"dera": lambda: DeRATokenizer.from_name("tiny"), "larp": lambda: LARPTokenizer.from_name("tiny"),
             "ar_generator": _gen}[kind]()
    model.train()
    model.save_pretrained(tmp_path / "m")
    header = json.loads((tmp_path / "m" / "config.json").read_text())
    assert header["model_type"] == kind and header["format_version"] == P.FORMAT_VERSION
    assert P.read_metadata(tmp_path / "m" / "model.safetensors")["dera_fast.model_type"] == kind
    for src in (tmp_path / "m", tmp_path / "m" / "model.safetensors"):
        back = type(model).from_pretrained(src, device="cpu")
        assert not back.training and back.config == model.config
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
        assert type(P.load_model(src)) is type(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing left beside the folder


def test_legacy_generator_folder_loads(tmp_path):
    """What ARGenerator.save_pretrained wrote before the shared format: a bare config, no model_type."""
    model = _gen()
    cfg_json = json.dumps(model.config.to_dict(), indent=2)
    (tmp_path / "config.json").write_text(cfg_json)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt", "dera_fast.kind": "generator", "dera_fast.config": cfg_json})
    back = ARGenerator.from_pretrained(tmp_path)
    assert back.config == model.config and not back.training
    assert P.read_header(tmp_path)["format_version"] == 0
    (tmp_path / "config.json").unlink()
    assert ARGenerator.from_pretrained(tmp_path / "model.safetensors").config == model.config
    with pytest.warns(FutureWarning, match="keyword"):
        ARGenerator.from_pretrained(tmp_path / "model.safetensors", "cpu")


def test_save_keeps_foreign_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    _gen().save_pretrained(tmp_path, files={"classes.json": "[]"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.json", "config.json", "model.safetensors",
                                                           "notes.txt"]
    _gen().save_pretrained(tmp_path / "new", files={"classes.json": "[]"})
    _gen().save_pretrained(tmp_path / "new")  # a folder of ours only: replaced as a whole
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["config.json", "model.safetensors"]


def _damage(folder, how):
    cfg, w = folder / "config.json", folder / "model.safetensors"
    header = json.loads(cfg.read_text())
    if how == "list":
        cfg.write_text("[1, 2]")
    elif how == "not-json":
        cfg.write_text("{config")
    elif how == "wrong-type":
        header["config"]["dim"] = "big"
        cfg.write_text(json.dumps(header))
    elif how == "unknown-field":
        header["config"]["dimension"] = 4
        cfg.write_text(json.dumps(header))
    elif how == "negative":
        header["config"]["num_heads"] = -4
        cfg.write_text(json.dumps(header))
    elif how == "no-config":
        del header["config"]
        cfg.write_text(json.dumps(header))
    elif how == "newer":
        header["format_version"] = P.FORMAT_VERSION + 1
        cfg.write_text(json.dumps(header))
    elif how == "pickle":
        w.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    elif how == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "missing-key":
        from safetensors.torch import load_file
        sd = load_file(w)
        sd.pop("queries")
        save_file(sd, w)
    elif how == "model-type":
        header["model_type"] = "vqgan"
        cfg.write_text(json.dumps(header))


@pytest.mark.parametrize("how,match", [
    ("list", "must hold a JSON object"), ("not-json", "not valid JSON"), ("wrong-type", "'dim' must be an int"),
    ("unknown-field", "unknown TokenizerConfig fields"), ("negative", "num_heads"), ("no-config", "'config'"),
    ("newer", "newer than this dera_fast"), ("pickle", "not a readable safetensors"),
    ("truncated", "not a readable safetensors"), ("missing-key", r"missing keys \['queries'\]"),
    ("model-type", "unknown model_type"),
])
def test_damaged_folders_are_refused_naming_the_file(tmp_path, how, match):
    LARPTokenizer.from_name("tiny").save_pretrained(tmp_path)
    _damage(tmp_path, how)
    with pytest.raises(ValueError, match=match) as e:
        LARPTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_architecture_hash_ignores_training_fields():
    base = TokenizerConfig.from_name("tiny")
    assert P.NON_ARCHITECTURE_FIELDS["TokenizerConfig"] <= set(base.to_dict())
    assert P.NON_ARCHITECTURE_FIELDS["GeneratorConfig"] <= set(GeneratorConfig().to_dict())
    h = P.architecture_hash(base)
    for field, value in (("vq_beta", 0.5), ("align_weight_motion", 0.1), ("prior_dropout", 0.0),
                         ("prior_ss_max_ratio", 0.2), ("query_init_std", 0.1)):
        assert P.architecture_hash(base.replace(**{field: value})) == h, field
    for field, value in (("dim", 32), ("codebook_size", 32), ("num_appearance_tokens", 2), ("patch", 4)):
        assert P.architecture_hash(base.replace(**{field: value})) != h, field
    g = GeneratorConfig.from_name("tiny")
    assert P.architecture_hash(g) == P.architecture_hash(GeneratorConfig.from_name("tiny", resid_dropout_p=0.0))


@pytest.mark.parametrize("kw,err,match", [
    (dict(dim="64"), TypeError, "'dim' must be an int"),
    (dict(mlp_ratio=float("nan")), ValueError, "'mlp_ratio' must be finite"),
    (dict(pixel_range=[0, 1, 2]), TypeError, "'pixel_range' must be a list of 2 numbers"),
    (dict(decoder_query_type_embed=1), TypeError, "true or false"),
    (dict(num_tokens=True), TypeError, "'num_tokens' must be an int"),
])
def test_config_field_checks(kw, err, match):
    with pytest.raises(err, match=match):
        TokenizerConfig.from_name("tiny", **kw)
    assert TokenizerConfig.from_name("tiny", mlp_ratio=4).mlp_ratio == 4.0  # ints are numbers too (hash-stable)
    assert isinstance(TokenizerConfig.from_name("tiny", pixel_range=[0, 1]).pixel_range, tuple)
    with pytest.raises(ValueError, match="n_layer"):
        GeneratorConfig.from_name("tiny", n_layer=0)
    with pytest.raises(TypeError, match="JSON object"):
        GeneratorConfig.from_dict([["dim", 4]])
