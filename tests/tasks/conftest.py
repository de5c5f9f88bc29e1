"""Tiny tokenizers built in code (byte-level BPE, a few hundred tokens): no files, no network."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Is the sentiment of this text negative, neutral or positive? Answer with one word.",
    "negative neutral positive yes no the cat sat on the mat",
    "Conversation so far: A: hello there B: how are you doing today?",
    "Summarize the article above in one sentence. Passage: Question: Answer:",
] * 20


def _backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def _trained() -> Tokenizer:
    return _backend()


@pytest.fixture
def chat_tokenizer(_trained):
    """Byte-level BPE with a ChatML chat template; EOS = <|im_end|>, pad = <|endoftext|>."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_trained.from_str(_trained.to_str()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


@pytest.fixture
def plain_tokenizer(_trained):
    """The same vocabulary without a chat template; EOS = pad = <|endoftext|>."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_trained.from_str(_trained.to_str()),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
