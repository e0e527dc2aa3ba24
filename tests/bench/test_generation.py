"""generate_texts: KV cache == no cache == a hand-written greedy loop; batching/padding changes nothing."""
import pytest
import torch

import deltatune as dt
from deltatune.bench.generation import generate_texts
from deltatune.errors import ConfigError
from deltatune.models import tiny_model, tiny_tokenizer

PROMPTS = ["Name = The Eagle, food = French", "hi", "area = riverside", "a much longer prompt, with commas and words"]
NEW = 8


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat_template=False)  # byte-level: ids 0-3 special, byte b -> id 4 + b


def lm(arch: str) -> torch.nn.Module:
    """A tiny random LM whose argmax is never pad/bos/unk, so outputs are long, non-trivial text
    (a random T5 otherwise emits only pad)."""
    model = tiny_model(arch, task="lm", vocab_size=260, eos_token_id=2, seed=1)  # seed 1: distinct outputs
    with torch.no_grad():
        model.get_output_embeddings().weight[[0, 1, 3]] = 0.0
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2", "t5"])
def model(request):
    return lm(request.param)


def greedy_ids(model, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    """Reference greedy decoding: full forward every step (no cache, no padding, no generate)."""
    enc_dec = model.config.is_encoder_decoder
    ids = torch.tensor([prompt])
    out = [model.config.decoder_start_token_id] if enc_dec else list(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            seq = torch.tensor([out])
            logits = model(input_ids=ids, decoder_input_ids=seq).logits if enc_dec else model(input_ids=seq).logits
            nxt = int(logits[0, -1].argmax())
            if nxt in eos:
                break
            new.append(nxt)
            out.append(nxt)
    return new


def test_matches_hand_written_greedy_and_no_cache(model, tok, one_thread):
    ref = [greedy_ids(model, tok(p)["input_ids"], NEW, {2}) for p in PROMPTS]
    assert len({tuple(r) for r in ref}) == len(ref) and all(ref)  # distinct, non-empty: not vacuous
    got = generate_texts(model, tok, PROMPTS, max_new_tokens=NEW)
    assert got == [tok.decode(r, skip_special_tokens=True).strip() for r in ref]
    assert generate_texts(model, tok, PROMPTS, max_new_tokens=NEW, use_cache=False) == got


def test_batched_padded_equals_one_at_a_time_in_order(model, tok, one_thread):
    alone = [generate_texts(model, tok, [p], max_new_tokens=NEW)[0] for p in PROMPTS]
    assert generate_texts(model, tok, PROMPTS, max_new_tokens=NEW, batch_size=4) == alone
    assert generate_texts(model, tok, PROMPTS, max_new_tokens=NEW, batch_size=3) == alone  # uneven batches
    assert generate_texts(model, tok, PROMPTS[::-1], max_new_tokens=NEW) == alone[::-1]


def test_token_id_prompts_equal_string_prompts(model, tok, one_thread):
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert generate_texts(model, tok, ids, max_new_tokens=NEW) == generate_texts(model, tok, PROMPTS, max_new_tokens=NEW)


def test_beam_search_returns_strings_and_tokenizer_untouched(model, tok, one_thread):
    side = tok.padding_side
    model.train()
    out = generate_texts(model, tok, PROMPTS, max_new_tokens=NEW, num_beams=2)
    assert len(out) == len(PROMPTS) and all(isinstance(t, str) for t in out)
    assert tok.padding_side == side and model.training  # both restored


def test_stops_at_eos_even_when_not_special(tok, one_thread):
    model = lm("llama")
    prompt = tok(PROMPTS[0])["input_ids"]
    full = greedy_ids(model, prompt, NEW, {2})
    stop = next(k for k in range(2, NEW) if full[k] not in full[:k])  # first new id not seen before
    model.generation_config.eos_token_id = full[stop]
    assert generate_texts(model, tok, [prompt], max_new_tokens=NEW) == [tok.decode(full[:stop]).strip()]


def test_pad_falls_back_to_eos_and_wrapper_model(tok, one_thread):
    base = lm("llama")
    dm = dt.wrap(lm("llama"), dt.LoRAConfig(r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in dm.trainable_parameters():
            p.normal_(0, 0.5)  # a non-zero delta, so the wrapper's output must differ from the base
    no_pad = tiny_tokenizer(chat_template=False)
    no_pad.pad_token = None
    got = generate_texts(dm, no_pad, PROMPTS, max_new_tokens=NEW)
    want = [no_pad.decode(greedy_ids(dm, no_pad(p)["input_ids"], NEW, {2})).strip() for p in PROMPTS]
    assert got == want and got != generate_texts(base, tok, PROMPTS, max_new_tokens=NEW)


def test_refuses_bad_arguments(tok):
    model = lm("gpt2")
    assert generate_texts(model, tok, []) == []
    with pytest.raises(ConfigError, match="mix"):
        generate_texts(model, tok, ["a", [5, 6]])
    with pytest.raises(ConfigError, match="prompt 1 has no tokens"):
        generate_texts(model, tok, ["a", ""])
    with pytest.raises(ConfigError, match="num_beams"):
        generate_texts(model, tok, ["a"], num_beams=0)
