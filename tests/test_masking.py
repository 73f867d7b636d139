"""Dynamic masking: statistics, what is never chosen, determinism per (seed, epoch, sample), whole words."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from core.model import IGNORE_INDEX
from pretrain.masking import Masker, MaskingConfig, word_start_table

VOCAB = 50265
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": VOCAB - 1}
SPECIAL_IDS = np.array(sorted(SPECIALS.values()))


def packed_batch(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """Samples shaped like the packer's: <s> ... </s> between documents ... </s>, some padded, some <unk>."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, VOCAB - 1, size=(batch, seq))
    tokens[rng.random((batch, seq)) < 0.01] = SPECIALS["unk"]
    tokens[rng.random((batch, seq)) < 0.01] = SPECIALS["eos"]
    tokens[:, 0] = SPECIALS["bos"]
    for b in range(batch):
        end = seq - 1 if b % 4 else int(rng.integers(3, seq - 1))  # every 4th sample is short
        tokens[b, end] = SPECIALS["eos"]
        tokens[b, end + 1 :] = SPECIALS["pad"]
    return tokens


def keys(batch: int, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return np.full(batch, epoch), np.arange(batch)


def test_statistics_rate_split_and_never_chosen():
    tokens = packed_batch(256, 512)  # 131K positions
    masker = Masker(MaskingConfig(), VOCAB, SPECIALS)
    input_ids, labels = masker(tokens, 1234, *keys(256))
    eligible = ~np.isin(tokens, SPECIAL_IDS)
    chosen = labels != IGNORE_INDEX
    assert eligible.sum() > 100_000
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.005
    assert not (chosen & ~eligible).any(), "a special or padding position was chosen"
    np.testing.assert_array_equal(labels[chosen], tokens[chosen])
    np.testing.assert_array_equal(input_ids[~chosen], tokens[~chosen])
    n = chosen.sum()
    to_mask = chosen & (input_ids == SPECIALS["mask"])
    kept = chosen & (input_ids == tokens)
    randomised = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum() / n - 0.8) < 0.01
    assert abs(randomised.sum() / n - 0.1) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01
    assert not np.isin(input_ids[randomised], SPECIAL_IDS).any(), "a random replacement is special"
    # random replacements cover the vocabulary, not a few ids
    assert len(np.unique(input_ids[randomised])) > 0.9 * randomised.sum()


def test_fixed_count_per_sample_with_random_rounding():
    tokens = packed_batch(64, 64, seed=1)
    _, labels = Masker(MaskingConfig(), VOCAB, SPECIALS)(tokens, 0, *keys(64))
    eligible = (~np.isin(tokens, SPECIAL_IDS)).sum(axis=1)
    counts = (labels != IGNORE_INDEX).sum(axis=1)
    expected = 0.15 * eligible
    assert ((counts == np.floor(expected)) | (counts == np.ceil(expected))).all()


def test_mask_depends_only_on_seed_epoch_and_index():
    tokens = packed_batch(8, 64)
    masker = Masker(MaskingConfig(), VOCAB, SPECIALS)
    epochs, idx = np.full(8, 3), np.arange(100, 108)
    whole = masker(tokens, 7, epochs, idx)
    # the same samples in another batch composition and order give the same masks
    order = np.array([5, 2, 7])
    part = masker(tokens[order], 7, epochs[order], idx[order])
    for a, b in zip(whole, part):
        np.testing.assert_array_equal(a[order], b)
    other_epoch = masker(tokens, 7, epochs + 1, idx)
    other_seed = masker(tokens, 8, epochs, idx)
    assert not np.array_equal(whole[1], other_epoch[1])
    assert not np.array_equal(whole[1], other_seed[1])


def test_mask_prob_zero_and_one():
    tokens = packed_batch(4, 32)
    eligible = ~np.isin(tokens, SPECIAL_IDS)
    _, none = Masker(MaskingConfig(mask_prob=0.0), VOCAB, SPECIALS)(tokens, 0, *keys(4))
    assert (none == IGNORE_INDEX).all()
    ids, every = Masker(MaskingConfig(mask_prob=1.0, mask_token_prob=1.0, random_token_prob=0.0),
                        VOCAB, SPECIALS)(tokens, 0, *keys(4))
    np.testing.assert_array_equal(every != IGNORE_INDEX, eligible)
    assert (ids[eligible] == SPECIALS["mask"]).all()


@pytest.mark.parametrize(
    "kwargs, key",
    [({"mask_prob": 1.5}, "mask_prob"), ({"random_token_prob": -0.1}, "random_token_prob"),
     ({"mask_token_prob": 0.9, "random_token_prob": 0.2}, "mask_token_prob")],
)
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"masking.{key}"):
        MaskingConfig(**kwargs)


def test_bad_special_ids_refused():
    with pytest.raises(ValueError, match="'mask' has id 50265"):
        Masker(MaskingConfig(), VOCAB, {**SPECIALS, "mask": VOCAB})
    with pytest.raises(ValueError, match="word_start"):
        Masker(MaskingConfig(whole_word=True), VOCAB, SPECIALS)


# --- whole-word masking ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A real byte-level BPE trained on a few lines (seconds): `Ġ` marks a word's first token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "unbelievable tokenization of words"] * 20
    tok.train_from_iterator(text, trainer)
    tok.add_special_tokens(["<mask>"])
    return tok


def test_word_start_table(tokenizer):
    table = word_start_table(tokenizer)
    vocab = tokenizer.get_vocab()
    assert len(table) == tokenizer.get_vocab_size()
    for name in ("<s>", "<pad>", "</s>", "<unk>", "<mask>"):
        assert table[vocab[name]]
    assert table[vocab["Ġthe"]] and not table[vocab["the"]]
    enc = tokenizer.encode("the unbelievable tokenization")
    assert [table[i] for i in enc.ids][0] == bool(enc.tokens[0].startswith("Ġ"))
    assert sum(table[i] for i in enc.ids) == 2  # "Ġunbelievable", "Ġtokenization" start; "the" does not


def test_whole_word_masks_complete_words():
    # a synthetic vocabulary: even ids >= 4 start a word, odd ids continue it
    vocab = 1000
    specials = {**SPECIALS, "mask": vocab - 1}
    word_start = np.zeros(vocab, dtype=bool)
    word_start[4::2] = True
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, vocab - 1, size=(128, 256))
    tokens[:, 0], tokens[:, -1] = 0, 2
    masker = Masker(MaskingConfig(whole_word=True), vocab, specials, word_start)
    _, labels = masker(tokens, 0, *keys(128))
    chosen = labels != IGNORE_INDEX
    is_start = word_start[tokens]
    is_start[:, 1] = True  # the token after <s> starts a word
    for b in range(128):
        starts = np.flatnonzero(is_start[b, 1:-1]) + 1
        words = np.split(np.arange(1, 255), starts[1:] - 1)
        for w in words:
            assert chosen[b, w].all() or not chosen[b, w].any(), "a word was masked in part"
        n_chosen_words = sum(chosen[b, w[0]] for w in words)
        assert n_chosen_words in (np.floor(0.15 * len(words)), np.ceil(0.15 * len(words)))
    assert not chosen[:, [0, -1]].any()
