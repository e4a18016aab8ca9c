"""dera_fast.generate: cached sampling, CFG, frame prediction, seeds, argument errors, torch.compile (CPU Inductor).

The compiled tests share one compiled decode step (module fixture): CPU Inductor compiles cost tens of seconds.
"""
import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from dera_fast.generate import Sampling, decode_one_token, generate, prefill
from dera_fast.models.ar import ARGenerator, GeneratorConfig

KW = dict(progress=False, kv_block=8)


def make(fp=False, seed=0):
    torch.manual_seed(seed)
    model = ARGenerator(GeneratorConfig.from_name("tiny", frame_prediction=fp)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the zero-init head would make every logit 0
    return model


@pytest.fixture(scope="module")
def model():
    return make()


@pytest.fixture(scope="module")
def fp_model():
    return make(fp=True, seed=1)


LABELS = torch.tensor([1, 3])


def teacher_forced_greedy(model, ids, **cond):
    """argmax of the full (uncached) forward on the generated ids: what greedy decoding must reproduce."""
    with torch.no_grad():
        return model(ids[:, :-1], **cond).argmax(-1)


@pytest.mark.parametrize("kv_mode", ["prefix", "whole"])
def test_greedy_matches_full_forward(model, kv_mode):
    out = generate(model, class_labels=LABELS, top_k=1, seed=0, kv_mode=kv_mode, **KW)
    assert out.ids.shape == (2, 16) and out.ids.dtype == torch.long
    assert torch.equal(teacher_forced_greedy(model, out.ids, class_labels=LABELS), out.ids)


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, class_labels=LABELS, seed=7, **KW).ids
    assert torch.equal(a, generate(model, class_labels=LABELS, seed=7, **KW).ids)
    assert not torch.equal(a, generate(model, class_labels=LABELS, seed=8, **KW).ids)
    b = generate(model, class_labels=LABELS, seed=7, top_k=3, top_p=0.8, temperature=0.7, **KW).ids
    assert torch.equal(b, generate(model, class_labels=LABELS, seed=7, top_k=3, top_p=0.8, temperature=0.7,
                                   **KW).ids)


def test_sampler_respects_top_k_and_top_p():
    from dera_fast.generate import sample_logits
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(4000, 5)
    noise = torch.empty(4000, 5).exponential_()
    t, kk, pp = torch.tensor(1.0), torch.tensor(2), torch.tensor(1.0)
    assert set(sample_logits(logits, noise, t, kk, pp, True).tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)  # p0 = 0.64, p0 + p1 = 0.88: top_p 0.7 keeps {0, 1}, 0.5 keeps {0}
    assert set(sample_logits(logits, noise, t, torch.tensor(0), torch.tensor(0.7), True).tolist()) == {0, 1}
    assert set(sample_logits(logits, noise, t, torch.tensor(0), torch.tensor(0.5), True).tolist()) == {0}
    freq = torch.bincount(sample_logits(logits, noise, t, kk, pp, False), minlength=5) / 4000
    assert torch.allclose(freq, p, atol=0.03)  # exponential race == multinomial


def test_cfg_scale_one_equals_unguided(model):
    """The doubled (conditional + null) batch at scale 1 gives the unguided tokens, step for step."""
    config = model.config
    noise = torch.empty(config.max_seq_len, 2, config.vocab_size).exponential_()
    unguided = Sampling.create(torch.device("cpu"), cfg_scale=1.0)
    assert not unguided.guided and not unguided.filtered
    runs = []
    with torch.no_grad():
        for guided in (False, True):
            sampling = dataclasses.replace(unguided, guided=guided)  # guided at scale 1
            model.setup_caches(4 if guided else 2, 17)
            labels = torch.cat([LABELS, torch.full_like(LABELS, config.num_classes)]) if guided else LABELS
            tok = prefill(model, model.embed_cond(class_labels=labels), noise[0], sampling)
            toks = [tok]
            for i in range(1, config.max_seq_len):
                tok = decode_one_token(model, tok.view(2, 1), torch.tensor([i]), model.kv_positions[:16], noise[i],
                                       sampling)
                toks.append(tok)
            runs.append(torch.stack(toks, 1))
    assert torch.equal(*runs)
    guided = model.generate(class_labels=LABELS, cfg_scale=1.25, seed=0, **KW).ids
    assert guided.shape == (2, 16) and not torch.equal(guided, generate(model, class_labels=LABELS, seed=0, **KW).ids)


def test_frame_prediction_conditioning(fp_model):
    cfg = fp_model.config
    ctx = torch.randint(0, cfg.vocab_size, (2, cfg.context_len))
    out = generate(fp_model, context_ids=ctx, top_k=1, seed=0, **KW).ids
    assert out.shape == (2, cfg.max_seq_len)
    assert torch.equal(teacher_forced_greedy(fp_model, out, context_ids=ctx), out)
    emb = fp_model.embed_cond(context_ids=ctx)  # context then SEP (id = vocab_size), LARP's protocol
    assert torch.equal(emb[:, -1], fp_model.tok_emb.weight[cfg.vocab_size].expand(2, -1))
    other = generate(fp_model, context_ids=ctx.flip(0), top_k=1, seed=0, **KW).ids
    assert torch.equal(other, out.flip(0))  # rows follow their own context
    assert not torch.equal(other[0], out[0])


def test_chunked_batches_and_video(model):
    class Tok:
        def decode(self, ids):
            return ids.float()[:, None, :, None, None].expand(-1, 3, -1, 2, 2)

    labels = torch.tensor([0, 1, 2, 3, 4])
    full = generate(model, class_labels=labels, top_k=1, seed=0, **KW)
    chunked = generate(model, class_labels=labels, top_k=1, seed=0, batch_size=2, tokenizer=Tok(),
                       return_video=True, **KW)
    assert torch.equal(full.ids, chunked.ids)  # last chunk padded to 2 rows, padding dropped
    assert chunked.video.shape == (5, 3, 16, 2, 2)
    assert chunked.stats["decode_tokens"] == 6 * 15 and chunked.stats["tokens_per_s"] > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_labels=torch.tensor([0, 5])), "class id 5 out of range"),
    (dict(class_labels=torch.tensor([-1])), "class id -1 out of range"),
    (dict(class_labels=LABELS, top_p=0.0), "top_p"),
    (dict(class_labels=LABELS, top_p=1.5), "top_p"),
    (dict(class_labels=LABELS, temperature=0.0), "temperature"),
    (dict(class_labels=LABELS, temperature=-1.0), "temperature"),
    (dict(class_labels=LABELS, top_k=-2), "top_k"),
    (dict(class_labels=LABELS, kv_mode="paged"), "kv_mode"),
    (dict(class_labels=LABELS, return_video=True), "tokenizer"),
    (dict(context_ids=torch.zeros(1, 16, dtype=torch.long)), "class_labels"),
], ids=["class-high", "class-neg", "top_p-0", "top_p-big", "temp-0", "temp-neg", "top_k", "kv_mode", "video",
        "context-on-class-model"])
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, **kwargs, **KW)


def test_bad_frame_prediction_arguments(fp_model):
    with pytest.raises(ValueError, match="longer than the model's maximum"):
        generate(fp_model, context_ids=torch.zeros(1, 17, dtype=torch.long), **KW)
    with pytest.raises(ValueError, match="context_ids must be"):
        generate(fp_model, context_ids=torch.zeros(1, 5, dtype=torch.long), **KW)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(fp_model, context_ids=torch.zeros(1, 16, dtype=torch.long), cfg_scale=1.5, **KW)


@pytest.mark.parametrize("n", [5, 17], ids=["short", "long"])
def test_context_length_is_checked_in_one_place(fp_model, n):
    """generate and the model refuse a wrong-length context with the same message (generate used to have its own
    check, which let a shorter context through to the model's)."""
    ctx = torch.zeros(1, n, dtype=torch.long)
    with pytest.raises(ValueError) as by_generate:
        generate(fp_model, context_ids=ctx, **KW)
    with pytest.raises(ValueError) as by_model:
        fp_model(torch.zeros(1, 3, dtype=torch.long), context_ids=ctx)
    assert str(by_generate.value) == str(by_model.value)
    assert ("exactly the context clip's" if n < 16 else "longer than the model's maximum") in \
        str(by_model.value)


def test_null_class_is_for_training_and_guidance_only(model):
    null = torch.tensor([model.config.num_classes])
    assert model(torch.zeros(1, 3, dtype=torch.long), class_labels=null).shape == (1, 4, 64)  # class dropout
    with pytest.raises(ValueError, match="class id 5 out of range"):
        generate(model, class_labels=null, **KW)
    with pytest.raises(ValueError, match="class id 6 out of range"):
        model(torch.zeros(1, 3, dtype=torch.long), class_labels=null + 1)
    with pytest.raises(ValueError, match="class_labels must be a non-empty int tensor"):
        generate(model, class_labels=[], **KW)


def test_decoding_functions_stay_small():
    """generate.py reads like gpt-fast's: no function over 40 lines, none with more than 6 positional parameters."""
    import ast
    import inspect

    import dera_fast.generate as module
    funcs = [n for n in ast.walk(ast.parse(inspect.getsource(module)))
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert {"generate", "decode_n_tokens", "decode_one_token", "prefill"} <= {f.name for f in funcs}
    for f in funcs:
        assert f.end_lineno - f.lineno + 1 < 40, f"{f.name} has {f.end_lineno - f.lineno + 1} lines"
        assert len(f.args.posonlyargs) + len(f.args.args) <= 6, f"{f.name} takes too many positional arguments"


# ---------------------------------------------------------------------------------------------------------------
# torch.compile (CPU Inductor): one compile of the prefix-mode step, shared by the tests below
# ---------------------------------------------------------------------------------------------------------------
FILTERED = dict(top_k=5, top_p=0.9, temperature=0.8)  # same graph as greedy top_k=1: the knobs are tensors


@pytest.fixture(scope="module")
def warmed(model):
    torch._dynamo.reset()
    counters.clear()
    out = generate(model, class_labels=LABELS, top_k=1, seed=0, compile=True, **KW)
    return out


def test_compiled_greedy_equals_eager(model, warmed):
    eager = generate(model, class_labels=LABELS, top_k=1, seed=0, **KW)
    assert torch.equal(warmed.ids, eager.ids)
    assert warmed.stats["warmup_s"] > 0


def test_compiled_sampling_equals_eager_and_no_recompiles(model, warmed):
    with torch._dynamo.config.patch(error_on_recompile=True):
        comp = generate(model, class_labels=LABELS, seed=3, compile=True, **FILTERED, **KW)
        comp2 = generate(model, class_labels=LABELS, seed=3, compile=True, **FILTERED, **KW)
    eager = generate(model, class_labels=LABELS, seed=3, **FILTERED, **KW)
    assert torch.equal(comp.ids, eager.ids) and torch.equal(comp.ids, comp2.ids)
    assert comp2.stats["warmup_s"] == 0  # every step shape was already compiled
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all prefix buckets (symbolic length)
    assert sum(counters["graph_break"].values()) == 0
