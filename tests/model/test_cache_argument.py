"""Segments hand the KV cache to Hugging Face layers under the name the installed transformers declares."""

import inspect
import warnings

import pytest
import torch

from fedsplit.model.segments import cache_argument
from fedsplit.model.split import split


def test_a_split_forward_with_a_kv_cache_raises_no_deprecation_warning(tiny, padded_batch):
    model, _ = tiny
    ids, pad, *_ = padded_batch
    parts = split(model, 1, 1)
    caches = parts.new_caches()
    # transformers' ``deprecate_kwarg`` warns with FutureWarning (DeprecationWarning is hidden by
    # default); both become errors here, for the prefill and for a decoding step on the cache.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        logits = parts(ids, pad, caches)
        parts(logits[:, -1].argmax(-1, keepdim=True), pad, caches)
    assert all(c.length == ids.shape[1] + 1 for c in caches)


@pytest.mark.parametrize("name", ["cache", "past_key_values", "past_key_value"])
def test_cache_argument_is_the_name_the_layer_declares(name):
    def forward(self, hidden, **kwargs):
        return hidden

    keyword = inspect.Parameter.KEYWORD_ONLY
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", keyword), inspect.Parameter(name, keyword, default=None)]
    )
    layer = type("Layer", (), {"forward": forward})
    assert cache_argument(layer) == name


def test_cache_argument_prefers_the_newest_name_when_a_layer_takes_several():
    class Layer:
        def forward(self, hidden, past_key_values=None, cache=None, **kwargs):
            return hidden

    assert cache_argument(Layer) == "cache"
