"""A shortened `python -m dera_fast demo`: every output file exists and the tokenizer learned something."""
import json


from dera_fast.cli import main


def test_short_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "300", "--gen-steps", "20", "--no-progress"]) == 0
    for name in ("reconstruction.mp4", "reconstruction.gif", "reconstruction.png", "samples.png", "samples.gif",
                 "tokens.safetensors", "summary.json", "tokenizer/metrics.jsonl", "tokenizer/model/config.json",
                 "generator/model/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["tokenizer_steps"] == 300 and s["threads"] == 1
    assert s["psnr_trained"] > s["psnr_untrained"] + 1.0  # the full demo also beats the mean frame; 300 steps may not
    out = capsys.readouterr().out
    assert "reconstruction PSNR" in out and "RANDOM teachers" in out
