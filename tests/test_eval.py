"""`eval tokenizer | generator | compare` end to end on a folder of videos, with tiny models and a random TorchScript
stand-in for StyleGAN-V's I3D: metrics and protocol in the JSON, real-statistics cache, the PSNR definition, the
exit-code contract, and (torchrun, 2 gloo processes) sharded == single-process.

Run as a script by torchrun (see test_torchrun_two_processes_equal_one)."""
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dera_fast.cli import main



class StandInI3D(nn.Module):
    """StyleGAN-V I3D's call signature (x in [-1, 1], rescale, resize, return_features) with a tiny random body."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 3, stride=2)
        self.fc = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1
        if resize:  # the real one resizes to 224; 16 keeps the stand-in cheap
            x = F.interpolate(x, size=(x.shape[2], 16, 16), mode="trilinear", align_corners=False)
        h = torch.relu(self.conv(x)).flatten(2)  # [B, 8, T'*H'*W']
        out = self.fc(torch.cat([h.mean(-1), h.std(-1)], 1))  # [B, 12]
        return out if return_features else out.softmax(-1)


def make_assets(d: Path) -> None:
    """Six 20-frame 40x40 videos in two class folders, a 16-frame tiny DeRA tokenizer, a class-conditional and a
    frame-prediction tiny generator, the I3D stand-in."""
    from dera_fast.data import SyntheticClips, write_video
    from dera_fast.models import DeRATokenizer
    from dera_fast.models.ar import ARGenerator, GeneratorConfig
    from dera_fast.models.config import TokenizerConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(StandInI3D()).save(str(d / "i3d.pt"))
    clips = SyntheticClips(6, frames=20, size=40, seed=0)
    for i in range(6):
        sub = d / "videos" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        write_video(sub / f"v{i}.mp4", clips[i]["video"], fps=8)
    tok = DeRATokenizer(TokenizerConfig.from_name("tiny", num_frames=16))
    nn.init.normal_(tok.output_layer.linear.weight, std=0.05)  # zero-initialised: make reconstructions vary
    tok.save_pretrained(d / "tok")
    ARGenerator(GeneratorConfig.from_name("tiny", vocab_size=64, max_seq_len=16, num_classes=2)).save_pretrained(
        d / "gen")
    ARGenerator(GeneratorConfig.from_name("tiny", vocab_size=64, max_seq_len=16, frame_prediction=True)
                ).save_pretrained(d / "fp")


COMMON = ["--device", "cpu", "--no-progress", "--workers", "0"]


def tok_args(d, out, *extra, data=None):
    return ["eval", "tokenizer", "--model", str(d / "tok"), "--data", str(data or d / "videos"), "--i3d",
            str(d / "i3d.pt"), "--batch-size", "4", "--out", str(out), *COMMON, *extra]


def gen_args(d, out, model="gen", *extra):
    return ["eval", "generator", "--model", str(d / model), "--tokenizer", str(d / "tok"), "--data",
            str(d / "videos"), "--i3d", str(d / "i3d.pt"), "--num-samples", "10", "--batch-size", "4", "--out",
            str(out), *COMMON, *extra]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    make_assets(d)
    return d


@pytest.fixture(scope="module")
def results(assets):
    """One tokenizer, class-conditional and frame-prediction evaluation (1 process), written to out/."""
    out = assets / "out"
    assert main(tok_args(assets, out / "tok.json")) == 0
    assert main(gen_args(assets, out / "gen.json", "gen", "--cfg", "1.25")) == 0
    assert main(gen_args(assets, out / "fp.json", "fp")) == 0
    return {k: json.loads((out / f"{k}.json").read_text()) for k in ("tok", "gen", "fp")}


def test_tokenizer_result_has_metrics_and_protocol(assets, results):
    res = results["tok"]
    m, p = res["metrics"], res["protocol"]
    assert res["kind"] == "dera_fast.eval/tokenizer" and m["num_videos"] == 6
    assert 0 < m["psnr"] < 60 and -1 < m["ssim"] < 1 and m["rfvd"] > 0 and 0 < m["codebook_usage"] <= 1
    assert 1 <= m["codebook_perplexity"] <= 64 and m["codebook_used"] + m["codebook_dead"] == 64
    expected = {"dataset": str((assets / "videos").resolve()), "dataset_kind": "folder", "num_videos": 6,
                "frames": 16, "size": 32, "value_range": [0.0, 1.0], "extractor": "i3d-torchscript:i3d.pt",
                "feature_dim": 12, "seed": 0, "cfg": None, "world_size": 1, "dtype": "float32"}
    assert {k: p[k] for k in expected} == expected
    import hashlib

    assert p["extractor_sha256"] == hashlib.sha256((assets / "i3d.pt").read_bytes()).hexdigest()
    assert p["dataset_digest"].startswith("sha256:") and p["package_version"] and p["git_sha"]
    assert res["models"]["tokenizer"]["weights_sha256"] == hashlib.sha256(
        (assets / "tok" / "model.safetensors").read_bytes()).hexdigest()
    assert res["throughput"]["clips_per_s"] > 0


def test_generator_results(results):
    g, f = results["gen"], results["fp"]
    assert g["metrics"]["gfvd"] > 0 and g["metrics"]["num_samples"] == 10 == g["metrics"]["num_real"]
    assert g["protocol"]["cfg"] == 1.25 and g["protocol"]["seed"] == 42 and g["protocol"]["context"] is None
    assert g["metrics"]["num_classes_sampled"] == 2
    assert f["metrics"]["fp_fvd"] > 0 and f["protocol"]["fvd_size"] == 64 and "context_frames=5" in \
        f["protocol"]["context"]
    assert set(g["models"]) == {"generator", "tokenizer"}


def test_frame_prediction_flags_named_when_ignored(assets, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dera_fast"):
        assert main(gen_args(assets, tmp_path / "g.json", "gen", "--context-frames", "3", "--fp-size", "0")) == 0
    assert "warning: --context-frames and --fp-size ignored: the generator is class-conditional" in caplog.text


def test_psnr_is_mean_of_per_video_psnr(assets, results):
    """PSNR = mean over videos of -10 log10(per-video MSE) on [0, 1], not -10 log10 of the mean MSE."""
    from dera_fast.data import VideoFolderDataset
    from dera_fast.models import DeRATokenizer

    tok = DeRATokenizer.from_pretrained(assets / "tok")
    ds = VideoFolderDataset(assets / "videos", 16, 32, train=False, value_range=(0.0, 1.0), seed=0)
    x = torch.stack([ds[i]["video"] for i in range(len(ds))])  # [6, 3, 16, 32, 32] in [0, 1]
    recon = torch.cat([tok.reconstruct(x[i:i + 4] * 2 - 1) for i in range(0, 6, 4)])  # same batches as the run
    r = ((recon + 1) / 2).clamp(0, 1)
    mse = (x.double() - r.double()).pow(2).flatten(1).mean(1)
    m = results["tok"]["metrics"]
    assert m["psnr"] == pytest.approx(float((-10 * mse.log10()).mean()), rel=1e-6)
    assert m["mse"] == pytest.approx(float(mse.mean()), rel=1e-6)
    assert abs(m["psnr"] - float(-10 * mse.mean().log10())) > 1e-3  # the two definitions differ on these clips


def test_csv_split_recorded_by_digest(assets, tmp_path):
    import hashlib

    csv = tmp_path / "split_val.csv"
    rows = [f"{i},{p.relative_to(assets).as_posix()},{p.parent.name},{int(p.parent.name == 'b')}"
            for i, p in enumerate(sorted((assets / "videos").rglob("*.mp4")))]
    csv.write_text("id,path,action,label\n" + "\n".join(rows[:4]) + "\n")
    out = tmp_path / "r.json"
    assert main(tok_args(assets, out, "--no-cache", "--root", str(assets), data=csv)) == 0
    p = json.loads(out.read_text())["protocol"]
    assert (p["dataset_kind"], p["split"], p["num_videos"], p["dataset_root"]) == ("csv", "split_val", 4,
                                                                                    str(assets.resolve()))
    assert p["dataset_digest"] == "sha256:" + hashlib.sha256(csv.read_bytes()).hexdigest()


def test_lpips_through_the_cli(assets, tmp_path):
    """--lpips-vgg / --lpips-heads: LPIPS per frame on [0, 1] clips, mean over all frames, heads recorded."""
    from safetensors.torch import save_file

    from dera_fast.data import VideoFolderDataset
    from dera_fast.models import DeRATokenizer
    from dera_fast.train.losses import PerceptualLoss

    torch.manual_seed(0)
    net = PerceptualLoss("vgg")
    for p in net.features.parameters():
        nn.init.normal_(p, std=0.05)
    save_file({f"features.{k}": v.contiguous() for k, v in net.features.state_dict().items()},
              str(tmp_path / "vgg.safetensors"))
    heads = {f"lin{i}.model.1.weight": torch.rand(1, h.numel(), 1, 1) for i, h in enumerate(net.heads)}
    save_file(heads, str(tmp_path / "heads.safetensors"))
    out = tmp_path / "lp.json"
    assert main(tok_args(assets, out, "--num-videos", "2", "--no-cache", "--lpips-vgg",
                         str(tmp_path / "vgg.safetensors"), "--lpips-heads", str(tmp_path / "heads.safetensors"))) == 0
    res = json.loads(out.read_text())
    assert res["protocol"]["lpips"]["heads"] == "file" and len(res["protocol"]["lpips"]["backbone_sha256"]) == 64
    ref_net = PerceptualLoss.from_weights(tmp_path / "vgg.safetensors", "vgg", tmp_path / "heads.safetensors")
    tok = DeRATokenizer.from_pretrained(assets / "tok")
    ds = VideoFolderDataset(assets / "videos", 16, 32, train=False, value_range=(0.0, 1.0), seed=0)
    from dera_fast.eval.sampling import select_clips

    idx = [i for _, i in select_clips(len(ds), 2, 0, repeat=False)]
    x = torch.stack([ds[i]["video"] for i in idx])
    r = ((tok.reconstruct(x * 2 - 1) + 1) / 2).clamp(0, 1)
    frames = [float(ref_net(x[v:v + 1, :, t:t + 1], r[v:v + 1, :, t:t + 1])) for v in range(2) for t in range(16)]
    assert res["metrics"]["lpips"] == pytest.approx(sum(frames) / len(frames), rel=1e-4)


def test_real_stats_cache_reused(assets, results, tmp_path, capsys):
    from safetensors import safe_open

    cache = results["tok"]["real_stats"]["path"]
    assert cache and Path(cache).parent == assets / "out" and not results["tok"]["real_stats"]["reused"]
    with safe_open(cache, "pt") as f:
        key = json.loads(f.metadata()["dera_fast.real_stats_key"])
        assert set(f.keys()) == {"mean", "m2", "num_items"}
    assert key["extractor_sha256"] == results["tok"]["protocol"]["extractor_sha256"] and key["split"] == "videos"
    again = assets / "out" / "tok_again.json"
    assert main(tok_args(assets, again)) == 0
    res = json.loads(again.read_text())
    assert res["real_stats"]["reused"] and "reused from" in capsys.readouterr().out
    assert res["metrics"] == pytest.approx(results["tok"]["metrics"], rel=1e-12)
    # Another seed is another clip set: not reused. Class-conditional caches hold the labels too.
    other = assets / "out" / "tok_seed1.json"
    assert main(tok_args(assets, other, "--seed", "1")) == 0
    assert not json.loads(other.read_text())["real_stats"]["reused"]
    with safe_open(results["gen"]["real_stats"]["path"], "pt") as f:
        assert f.get_tensor("labels").shape == (10,)
    gen_again = assets / "out" / "gen_again.json"
    assert main(gen_args(assets, gen_again, "gen", "--cfg", "1.25")) == 0
    res = json.loads(gen_again.read_text())
    assert res["real_stats"]["reused"] and res["metrics"]["gfvd"] == pytest.approx(
        results["gen"]["metrics"]["gfvd"], rel=1e-12)


def test_compare(assets, results, capsys):
    out = assets / "out"
    assert main(["eval", "compare", str(out / "tok.json"), str(out / "tok_again.json")]) == 0
    table = capsys.readouterr().out
    assert "rfvd" in table and "psnr" in table and "b - a" in table
    if not (out / "tok_seed1.json").exists():
        assert main(tok_args(assets, out / "tok_seed1.json", "--seed", "1")) == 0
        capsys.readouterr()
    assert main(["eval", "compare", str(out / "tok.json"), str(out / "tok_seed1.json")]) == 2
    err = capsys.readouterr().err
    assert "different protocols" in err and "seed (0 vs 1)" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "compare", str(out / "tok.json"), str(out / "gen.json")]) == 2
    # Informational fields (world size, git sha, ...) are noted, and refused only with --strict.
    edited = json.loads((out / "tok.json").read_text())
    edited["protocol"]["world_size"] = 8
    (out / "tok_w8.json").write_text(json.dumps(edited))
    capsys.readouterr()
    assert main(["eval", "compare", str(out / "tok.json"), str(out / "tok_w8.json")]) == 0
    assert "note: world_size differs" in capsys.readouterr().out
    assert main(["eval", "compare", "--strict", str(out / "tok.json"), str(out / "tok_w8.json")]) == 2


@pytest.mark.parametrize("argv,msg", [
    pytest.param(["eval", "tokenizer", "--model", "{d}/nope", "--data", "{d}/videos", "--i3d", "{d}/i3d.pt"],
                 "nope", id="missing-model"),
    pytest.param(["eval", "tokenizer", "--model", "{d}/tok", "--data", "{d}/nope", "--i3d", "{d}/i3d.pt"],
                 "not found", id="missing-data"),
    pytest.param(["eval", "tokenizer", "--model", "{d}/tok", "--data", "{d}/videos", "--i3d", "{d}/nope.pt"],
                 "file not found", id="missing-i3d"),
    pytest.param(["eval", "tokenizer", "--model", "{d}/tok", "--data", "{d}/videos", "--i3d",
                  "{d}/tok/config.json"], "not a loadable TorchScript", id="i3d-not-torchscript"),
    pytest.param(["eval", "tokenizer", "--model", "{d}/tok", "--data", "{d}/videos", "--i3d", "{d}/i3d.pt",
                  "--num-videos", "7"], "more than the 6 videos", id="too-many-videos"),
    pytest.param(["eval", "tokenizer", "--model", "{d}/tok8", "--data", "{d}/videos", "--i3d", "{d}/i3d.pt"],
                 "at least 10 frames", id="clips-too-short-for-i3d"),
    pytest.param(["eval", "tokenizer", "--model", "{d}/tok", "--data", "{d}/videos", "--i3d", "{d}/i3d.pt",
                  "--lpips-vgg", "{d}/vgg.safetensors"], "file not found", id="missing-lpips"),
    pytest.param(["eval", "generator", "--model", "{d}/fp", "--tokenizer", "{d}/tok", "--data", "{d}/videos",
                  "--i3d", "{d}/i3d.pt", "--cfg", "1.25"], "no classifier-free guidance", id="fp-with-cfg"),
    pytest.param(["eval", "generator", "--model", "{d}/gen", "--tokenizer", "{d}/tok32", "--data", "{d}/videos",
                  "--i3d", "{d}/i3d.pt"], "does not match", id="generator-tokenizer-mismatch"),
    pytest.param(["eval", "generator", "--model", "{d}/tok", "--tokenizer", "{d}/tok", "--data", "{d}/videos",
                  "--i3d", "{d}/i3d.pt"], "", id="tokenizer-as-generator"),
    pytest.param(["eval", "compare", "{d}/tok/config.json", "{d}/tok/config.json"], "not a dera_fast eval result",
                 id="compare-not-a-result"),
    pytest.param(["eval", "compare", "{d}/a.json", "{d}/b.json"], "not found", id="compare-missing"),
    pytest.param(["eval"], "say what to evaluate", id="no-subcommand"),
])
def test_user_mistakes_exit_2(assets, capsys, tmp_path, argv, msg):
    from dera_fast.models import DeRATokenizer

    if not (assets / "tok8").exists():  # an 8-frame tokenizer (the plain tiny preset), one with 32 codes
        DeRATokenizer.from_name("tiny").save_pretrained(assets / "tok8")
        DeRATokenizer.from_name("tiny", num_frames=16, codebook_size=32).save_pretrained(assets / "tok32")
    argv = [a.format(d=assets) for a in argv]
    if argv[1:2] != ["compare"] and len(argv) > 1:
        argv += [*COMMON, "--out", str(tmp_path / "r.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("extra", [["--num-videos", "0"], ["--num-videos", "x"], ["--batch-size", "-1"],
                                   ["--seed", "-3"], ["--workers", "1.5"]],
                         ids=["num-videos-0", "num-videos-x", "batch-size-neg", "seed-neg", "workers-float"])
def test_bad_numbers_exit_2(assets, capsys, extra):
    with pytest.raises(SystemExit) as e:
        main(tok_args(assets, assets / "never.json", *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err


@pytest.mark.parametrize("extra", [["--cfg", "nan"], ["--top-p", "1.5"], ["--top-p", "0"], ["--temperature", "0"],
                                   ["--num-samples", "1"], ["--top-k", "-1"]],
                         ids=["cfg-nan", "top-p-1.5", "top-p-0", "temperature-0", "num-samples-1", "top-k-neg"])
def test_bad_generator_numbers_exit_2(assets, capsys, extra):
    with pytest.raises(SystemExit) as e:
        main(gen_args(assets, assets / "never.json", "gen", *extra))
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_out_must_be_new_json_and_not_an_input(assets, results, capsys):
    for out, msg in ((assets / "r.txt", "expected a .json"), (assets / "videos", "is a folder"),
                     (assets / "tok" / "config.json", "is an input file"),
                     (assets / "out" / "tok.json", "exists; pass --overwrite")):
        before = out.read_bytes() if out.is_file() else None
        assert main(tok_args(assets, out)) == 2
        assert msg in capsys.readouterr().err
        assert before is None or out.read_bytes() == before
    assert main(tok_args(assets, assets / "out" / "tok.json", "--overwrite")) == 0
    assert json.loads((assets / "out" / "tok.json").read_text())["metrics"] == pytest.approx(
        results["tok"]["metrics"], rel=1e-12)


# ---------------------------------------------------------------------------------------------------- torchrun


def _worker(d: str, out: str) -> None:
    """Under torchrun: the three CLI evaluations, and reduce_feature_stats on uneven shards (one rank empty)."""
    import torch.distributed as dist

    from dera_fast.eval.stats import reduce_feature_stats
    from dera_fast.metrics import FeatureStats
    from dera_fast.train.distributed import DistInfo

    torch.set_num_threads(1)
    d, out = Path(d), Path(out)
    # NOTE: one process group for all commands (they leave a group they did not create up): gloo does not
    # reliably re-initialise right after a destroy in the same process.
    dist.init_process_group("gloo")
    assert main(tok_args(d, out / "tok.json", "--no-cache")) == 0
    assert main(gen_args(d, out / "gen.json", "gen", "--cfg", "1.25", "--no-cache")) == 0
    assert main(gen_args(d, out / "fp.json", "fp", "--no-cache")) == 0
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    feats = torch.randn(37, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 + 3
    for shards in ([30, 7], [37, 0], [1, 36]):
        mine = feats.split(shards)[rank]
        stats = FeatureStats()
        for chunk in mine.split(5):
            stats.update(chunk)
        total = reduce_feature_stats(stats, info)
        assert total.num_items == 37
        torch.testing.assert_close(total.mean(), feats.mean(0), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(total.cov(), torch.cov(feats.T, correction=0), rtol=1e-12, atol=1e-12)
    dist.destroy_process_group()
    if rank == 0:
        print("EVAL-DIST-OK")
    sys.stdout.flush()
    os._exit(0)  # skip teardown: gloo's process-group destructor can deadlock (tests/conftest.py: exit_worker)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(assets, results, tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(assets), str(tmp_path)]
    from conftest import run_process_group  # here, not at the top: torchrun also runs this file as a script

    res = run_process_group(cmd, env=env, timeout=600)
    assert res.returncode == 0 and "EVAL-DIST-OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("tok", "gen", "fp"):
        two = json.loads((tmp_path / f"{name}.json").read_text())
        one = results[name]
        assert two["protocol"]["world_size"] == 2
        defining = {k: v for k, v in one["protocol"].items() if k not in ("world_size", "git_sha")}
        assert {k: two["protocol"][k] for k in defining} == defining
        # Per-clip outputs are identical (same global batches); sums differ at most by float64 round-off.
        assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-9, abs=1e-12), name
    tok_two, tok_one = (json.loads((tmp_path / "tok.json").read_text())["metrics"], results["tok"]["metrics"])
    assert {k: tok_two[k] for k in ("codebook_used", "codebook_dead", "num_videos")} == \
        {k: tok_one[k] for k in ("codebook_used", "codebook_dead", "num_videos")}


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
