"""Every registered method on the generative tasks: causal LM on tiny Llama (tied embeddings, grouped
KV heads: SmolLM2's layout) and GPT-2, seq2seq on tiny T5.

Each (method, architecture) cell ends one of two ways, never skipped:
(a) ``dm.add`` refuses it with a DeltaError whose message says why and what to use instead
    (``REFUSED`` lists every such cell, so a method that starts or stops working is noticed), or
(b) it trains: identity at init where the method promises it (``NOT_IDENTITY`` lists the methods
    that change the output by design), a finite loss from ``labels``, nonzero gradients on the
    delta and none on the base (also right after a sparse method's switch to its compact form),
    3 AdamW steps change the loss, and ``generate`` (greedy and beam) gives the same tokens with
    and without the KV cache, its first token being the argmax of the delta's own forward.

Methods that only combine other trained deltas (``Delta.combiner``, e.g. fusion) are no cells.
Options: defaults, plus the config's ``run_length_fields`` for a 3-step run, as a training harness
fills them (AdaLoRA's ``total_step``; the sparse methods' ``switch_at``, so that their switch to
the compact form happens mid-run and training goes on in it).
"""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.registry import get_method
from deltatune.models import tiny_model

STEPS = 3
LR = 1e-2
ARCHS = ("llama", "gpt2", "t5")
METHODS = [m for m in dt.available_methods() if not get_method(m).delta_cls.combiner]

# (method, arch): (why, the fix), both substrings of the refusal message.
_LST = ("BERT-family encoders only", "Use 'lora' or 'adapter'")
_PREFIX = ("not the encoder-decoder", "encoder reads none")
REFUSED: dict[tuple[str, str], tuple[str, str]] = {
    ("bitfit", "llama"): ("has no bias parameters", "use 'layernorm'"),
    ("bitfit", "t5"): ("has no bias parameters", "use 'layernorm'"),
    ("lst", "llama"): _LST,
    ("lst", "gpt2"): _LST,
    ("lst", "t5"): _LST,
    ("prefix", "t5"): (_PREFIX[0], "use 'prompt' or 'ptuning'"),
    ("mam", "t5"): (_PREFIX[0], "use 'adapter' with placement='parallel'"),
    ("unipelt", "t5"): (_PREFIX[0], "components=['lora', 'adapter']"),
}
# Methods whose fresh delta changes the output by design (the rest must equal the base within 1e-5).
NOT_IDENTITY = {
    "prompt": "virtual tokens join the input",
    "ptuning": "virtual tokens join the input",
    "prefix": "prefix keys and values take attention mass",
    "mam": "its prefix (the parallel adapter starts at zero)",
    "unipelt": "its prefix, on by default (LoRA and the adapter start at zero)",
}
CELLS = [(m, a) for m in METHODS for a in ARCHS]


def make_model(arch: str) -> torch.nn.Module:
    extra = {"tie_word_embeddings": True} if arch == "llama" else {}  # as in SmolLM2
    return tiny_model(arch, task="lm", **extra)


def encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def make_batch(model) -> dict[str, torch.Tensor]:
    """Two examples, one padded: on the left for decoders (as batched generation pads), on the
    right of the encoder input for T5."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id
    if encoder_decoder(model):
        mask[1, -2:] = 0
        labels = torch.randint(3, model.config.vocab_size, (2, 5), generator=g)
    else:
        mask[1, :2] = 0
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask, "labels": labels}


def options(method: str) -> dict:
    """The fields that follow from the run's length (as a training harness fills them)."""
    return dict(get_method(method).config_cls.run_length_fields(STEPS))


def no_hooks(model) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def eval_forward(module, x):
    was = module.training
    module.eval()
    try:
        return module(**x)
    finally:
        module.train(was)


def check_gradients(dm, model, deltas) -> None:
    params = {id(p) for d in deltas for p in d.parameters()}
    trainable = dm.trainable_parameters()
    assert trainable, "the delta has no trainable tensor"
    assert all(id(p) in params for p in trainable), "a trainable tensor outside the deltas"
    assert all(p.grad is None for p in model.parameters()), "a base parameter got a gradient"
    missing = [f"{d.name}.{n}" for d in deltas for n, p in d.named_parameters()
               if p.requires_grad and p.grad is None]
    assert not missing, f"trainable tensors the loss does not reach: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in trainable)
    assert sum(float(p.grad.abs().sum()) for p in trainable) > 0, "all gradients are zero"


def check_trains(dm, model, x, base, identity: bool) -> None:
    deltas = [dm.get_delta(n) for n in dm.active]
    # identity at init (or, by design, not)
    start = eval_forward(dm, x)
    assert start.logits.shape == base.logits.shape
    gap = float((start.logits - base.logits).abs().max())
    if identity:
        assert gap <= 1e-5, f"not the base model at init: max |logit diff| = {gap:.2e}"
        assert abs(float(start.loss) - float(base.loss)) <= 1e-5
    else:
        assert gap > 1e-5, "identity at init: take it out of NOT_IDENTITY"
    assert torch.isfinite(start.loss)

    # training: gradients on the delta only (checked again right after a switch of tensors)
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=LR)
    version, check = dm.param_version, True
    dm.train()
    for step in range(STEPS):
        loss = dm(**x).loss
        assert loss is not None and torch.isfinite(loss), f"step {step}: loss {loss}"
        (loss + dm.regularization()).backward()
        if check:
            check_gradients(dm, model, deltas)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dm.step(step)
        check = dm.param_version != version
        if check:  # a sparse switch replaced the trainable tensors: a new optimizer over them
            opt, version = torch.optim.AdamW(dm.trainable_parameters(), lr=LR), dm.param_version
    dm.eval()
    end = eval_forward(dm, x)
    assert torch.isfinite(end.loss)
    assert abs(float(end.loss) - float(start.loss)) > 1e-6, "3 AdamW steps left the loss unchanged"

    # generation: same tokens with and without the cache; the first one is the delta's argmax
    ids, mask = x["input_ids"], x["attention_mask"]
    for extra in ({}, {"num_beams": 2}):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **extra)
        cached = dm.generate(**kw, use_cache=True)
        uncached = dm.generate(**kw, use_cache=False)
        assert torch.equal(cached, uncached), (extra, cached.tolist(), uncached.tolist())
    greedy = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        if encoder_decoder(model):
            assert 2 <= greedy.shape[1] <= 5  # decoder start + up to 4 tokens
            start_ids = torch.full((2, 1), model.config.decoder_start_token_id)
            first = dm(input_ids=ids, attention_mask=mask, decoder_input_ids=start_ids).logits[:, -1].argmax(-1)
            assert torch.equal(greedy[:, 1], first)
        else:
            assert ids.shape[1] < greedy.shape[1] <= ids.shape[1] + 4
            assert torch.equal(greedy[:, :ids.shape[1]], ids)
            first = dm(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1].argmax()  # unpadded row
            assert int(greedy[0, ids.shape[1]]) == int(first)


@pytest.mark.parametrize("method,arch", CELLS, ids=[f"{m}-{a}" for m, a in CELLS])
def test_method_trains_or_is_refused(method, arch):
    model = make_model(arch)
    x = make_batch(model)
    dm = dt.DeltaModel(model)
    config = {"method": method, **options(method)}
    refusal = REFUSED.get((method, arch))
    if refusal is not None:
        why, fix = refusal
        with pytest.raises(dt.DeltaError) as err:
            dm.add("d", config)
        msg = str(err.value)
        assert why in msg and fix in msg and method in msg, msg
        assert dm.deltas == [] and no_hooks(model), "a refused delta left something attached"
        return
    base = eval_forward(model, x)
    try:
        dm.add("d", config)
    except dt.DeltaError as e:
        pytest.fail(f"{method} on {arch} is refused ({type(e).__name__}: {e}); if that is intended, "
                    f"add it to REFUSED")
    check_trains(dm, model, x, base, identity=method not in NOT_IDENTITY)


# The fixes that refusal messages name, where they are deltatune configs, train too.
ALTERNATIVES = {
    "unipelt-lora-adapter-t5": ("t5", [{"method": "unipelt", "components": ["lora", "adapter"]}], True),
    "adapter-parallel+prompt-t5": ("t5", [{"method": "adapter", "placement": "parallel"},
                                          {"method": "prompt"}], False),
}


@pytest.mark.parametrize("case", list(ALTERNATIVES))
def test_suggested_alternatives_train(case):
    arch, configs, identity = ALTERNATIVES[case]
    model = make_model(arch)
    x = make_batch(model)
    base = eval_forward(model, x)
    dm = dt.DeltaModel(model)
    names = [f"d{i}" for i in range(len(configs))]
    for name, cfg in zip(names, configs):
        dm.add(name, cfg)
    dm.activate(*names)
    check_trains(dm, model, x, base, identity=identity)


def test_compacter_default_bottleneck_fits_n():
    """hidden // reduction_factor rounded down to a multiple of n (at least n): SmolLM2's 576 -> 16."""
    assert dt.CompacterConfig().bottleneck_size(576) == 16
    assert dt.CompacterConfig().bottleneck_size(32) == 4 and dt.CompacterConfig(n=2).bottleneck_size(768) == 24
    assert dt.CompacterConfig(bottleneck=6).bottleneck_size(576) == 6  # explicit: as given (then refused)


def test_tables_name_registered_methods_and_archs():
    assert {m for m, _ in REFUSED} <= set(METHODS) and {a for _, a in REFUSED} <= set(ARCHS)
    assert set(NOT_IDENTITY) <= set(METHODS)
    assert "fusion" not in METHODS and get_method("fusion").delta_cls.combiner
    assert len(METHODS) >= 20
