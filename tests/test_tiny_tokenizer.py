"""The in-memory byte-level tokenizer for generation tests."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deltatune.models import TINY_VOCAB_SIZE, tiny_model, tiny_tokenizer  # noqa: E402

TOK = tiny_tokenizer()
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
            {"role": "assistant", "content": "Hello."}]


TEXTS = ["", " ", "  leading and trailing  ", "héllo wörld\n\t\r\n", "日本語 🙂👍🏽", "\x00\x7f\u200b\ufeff",
         "<s> markers in text </s> <pad>", "a" * 300]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    ids = TOK(text)["input_ids"]
    assert TOK.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(text):
    ids = TOK.encode(text, add_special_tokens=False)
    assert TOK.decode(ids) == text
    assert max(ids, default=0) < TINY_VOCAB_SIZE


def test_ids_are_bytes_plus_four():
    text = "aé🙂"
    assert TOK.encode(text, add_special_tokens=False) == [b + 4 for b in text.encode("utf-8")]


def test_special_tokens():
    assert (TOK.pad_token, TOK.bos_token, TOK.eos_token, TOK.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id, TOK.unk_token_id) == (0, 1, 2, 3)
    assert len(TOK) == TOK.vocab_size == TINY_VOCAB_SIZE == 260
    assert TOK.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert TOK.decode([1, 5 + 4, 2], skip_special_tokens=True) == "\x05"


def test_matches_tiny_model_ids():
    model = tiny_model("llama", task="lm", vocab_size=TINY_VOCAB_SIZE)
    cfg = model.config
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)


def test_chat_template():
    want = "<|system|>\nBe brief.\n<|user|>\nHi 🙂\n<|assistant|>\nHello.\n"
    assert TOK.apply_chat_template(MESSAGES, tokenize=False) == want
    prompt = TOK.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nHi 🙂\n<|assistant|>\n"
    ids = TOK.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert TOK.decode(ids) == prompt


def test_no_chat_template():
    tok = tiny_tokenizer(chat_template=False)
    assert tok.chat_template is None
    with pytest.raises(ValueError):
        tok.apply_chat_template(MESSAGES, tokenize=False)


def test_left_padding_batch_and_generate():
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    batch = tok(["a", "abc"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[0, 0, 97 + 4], [97 + 4, 98 + 4, 99 + 4]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    model = tiny_model("llama", task="lm", vocab_size=TINY_VOCAB_SIZE)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, 7)
    alone = model.generate(**tok(["a"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert torch.equal(out[0, 3:], alone[0, 1:])  # left padding does not change the greedy continuation
    assert isinstance(tok.batch_decode(out[:, 3:]), list)
