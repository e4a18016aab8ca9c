"""One switch for the library's progress bars: the call's progress=, dera_fast.set_progress_bar_config, and
DERA_FAST_PROGRESS (dera_fast/_progress.py), as used by generate, encode_video / encode_stream and the trainers."""
import io
import os
import subprocess
import sys

import pytest
import torch

import dera_fast
from dera_fast import _progress
from dera_fast.generate import generate
from dera_fast.models import LARPTokenizer
from dera_fast.models.ar import ARGenerator, GeneratorConfig
from dera_fast.train.loop import progress_bar as training_bar


@pytest.fixture(autouse=True)
def restore_config():
    before = dict(_progress._config)
    yield
    _progress._config.clear()
    _progress._config.update(before)


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return ARGenerator(GeneratorConfig.from_name("tiny")).eval()


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return LARPTokenizer.from_name("tiny").eval()


def sample(gen, **kw):
    return generate(gen, class_labels=[1, 2], seed=0, kv_block=8, **kw).ids


def test_setter_is_exported():
    assert dera_fast.set_progress_bar_config is _progress.set_progress_bar_config
    assert "set_progress_bar_config" in dera_fast.__all__


@pytest.mark.parametrize("setting", [True, False, None], ids=["off", "on", "auto"])
def test_call_argument_wins_over_the_package_setting(setting):
    dera_fast.set_progress_bar_config(disable=setting)
    assert _progress.progress_bar(range(3), progress=True).disable is False
    assert _progress.progress_bar(range(3), progress=False).disable is True
    follows = _progress.progress_bar(range(3))
    # auto is tqdm's rule: off here because pytest's captured stderr is not a terminal
    assert follows.disable is (setting if setting is not None else not sys.stderr.isatty())
    assert training_bar(10, 0, "train", None).disable is follows.disable
    assert training_bar(10, 0, "train", False).disable is True  # what the trainers pass on ranks > 0


def test_package_tqdm_settings_reach_every_bar():
    out = io.StringIO()
    dera_fast.set_progress_bar_config(disable=False, file=out, mininterval=7.0)
    bar = _progress.progress_bar(range(3), desc="job", mininterval=0.1)
    assert bar.mininterval == 7.0 and not bar.disable
    bar.close()
    assert "job" in out.getvalue()
    dera_fast.set_progress_bar_config(leave=False)  # a new call replaces the old settings; disable from the env
    assert _progress._config == {"disable": _progress._disable_from_env(), "leave": False}


def test_generate_and_encode_follow_the_switch(gen, tok, capfd):
    video = torch.rand(3, 12, tok.config.size, tok.config.size) * 2 - 1
    dera_fast.set_progress_bar_config(disable=True)
    ref = sample(gen)
    ids = tok.encode_video(video, stride=4, batch_size=1)
    assert capfd.readouterr().err == ""
    assert torch.equal(sample(gen, progress=True), ref)  # the call wins
    assert "generate" in capfd.readouterr().err
    dera_fast.set_progress_bar_config(disable=False)  # shown even though stderr is captured
    assert torch.equal(tok.encode_video(video, stride=4, batch_size=1), ids)
    err = capfd.readouterr().err
    assert "encode" in err and "2/2" in err
    assert torch.equal(torch.cat([i for _, i in tok.encode_stream(iter([video[:, :8]]))]), ids[:1])
    assert "encode" in capfd.readouterr().err  # streaming: no total, still a bar
    assert torch.equal(sample(gen), ref) and "generate" in capfd.readouterr().err


@pytest.mark.parametrize("value,shown", [("1", True), ("0", False)])
def test_environment_variable_sets_the_default(value, shown):
    code = ("import torch; from dera_fast.generate import generate; from dera_fast.models.ar import ARGenerator, "
            "GeneratorConfig; generate(ARGenerator(GeneratorConfig.from_name('tiny')), class_labels=[0], seed=0)")
    env = {**os.environ, "DERA_FAST_PROGRESS": value, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert ("generate" in res.stderr) is shown  # stderr is a pipe: tqdm alone would hide the bar


def test_environment_variable_parsing(monkeypatch):
    for value, disable in [("0", True), ("off", True), ("1", False), ("true", False), ("", None), ("auto", None)]:
        monkeypatch.setenv("DERA_FAST_PROGRESS", value)
        assert _progress._disable_from_env() is disable, value
    monkeypatch.setenv("DERA_FAST_PROGRESS", "sometimes")
    with pytest.warns(UserWarning, match="DERA_FAST_PROGRESS='sometimes' not understood"):
        assert _progress._disable_from_env() is None
