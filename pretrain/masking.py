"""Dynamic masking for masked-language-model pretraining (RoBERTa §4.1, BERT §3.1).

Masks are drawn when a batch is made, so every epoch sees a fresh mask of the same block:

- eligible positions: every position whose token is not special (`<s>`, `<pad>`, `</s>`, `<unk>`,
  `<mask>`); padding is special, so it is never chosen;
- per sample, exactly `floor(mask_prob * n_eligible + u)` positions are chosen (u ~ U[0, 1): random
  rounding, as fairseq does), uniformly among the eligible ones; the expected count is
  `mask_prob * n_eligible` and short samples still get masked now and then;
- of the chosen positions, each independently becomes `<mask>` with probability `mask_token_prob`, a
  random NON-special token with probability `random_token_prob`, and stays as it is otherwise;
- labels hold the original token at chosen positions and -100 everywhere else.

Whole-word masking (optional): a word is a token that starts a word (`word_start[id]`, see
`word_start_table`) plus the tokens that continue it; a token right after a special token also starts a
word (the first word of a document has no `Ġ`). Exactly `floor(mask_prob * n_words + u)` of the sample's
eligible words are chosen, and all of their tokens are masked. A word cut by a block boundary at the start
of a sample continues `<s>` and is never chosen.

Determinism: the random numbers of a sample come from a counter-based generator keyed by
(seed, epoch, index) alone (`sample_keys`, `uniforms`: SplitMix64's finaliser over a Weyl sequence, the
generator of Java's SplittableRandom), so a sample's mask does not depend on which worker, rank or batch
makes it. Draws are computed for the whole batch at once, and only those that are used: several times
cheaper than one `np.random.default_rng` per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from core.model import IGNORE_INDEX  # the label of a position that is not predicted

if TYPE_CHECKING:
    import tokenizers



_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's Weyl increment (2^64 / golden ratio)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection of uint64 with strong avalanche), elementwise."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, epochs: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """uint64 key of each sample: seed, epoch and index hashed in turn."""
    with np.errstate(over="ignore"):
        key = _mix64(np.full(len(epochs), seed % 2**64, dtype=np.uint64) + _GAMMA)
        key = _mix64(key + np.asarray(epochs, dtype=np.int64).astype(np.uint64) * _GAMMA)
        return _mix64(key + np.asarray(indices, dtype=np.int64).astype(np.uint64) * _GAMMA)


def uniforms(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Draw number `counters` of the samples with `keys` (broadcast together): float64 in [0, 1).

    Draw j of a key is `mix64(key + (j + 1) * GAMMA)`: any draw is computed directly, without the ones
    before it, so a caller computes only the draws it needs.
    """
    with np.errstate(over="ignore"):
        bits = _mix64(keys + (np.asarray(counters).astype(np.uint64) + np.uint64(1)) * _GAMMA)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class MaskingConfig:
    """How tokens are masked; a Hydra config node (`data.masking`)."""

    mask_prob: float = 0.15
    """Fraction of eligible (non-special) positions (or words, with whole_word) chosen for prediction."""
    mask_token_prob: float = 0.8
    """Of the chosen positions, the fraction replaced by `<mask>`."""
    random_token_prob: float = 0.1
    """Of the chosen positions, the fraction replaced by a random non-special token; the rest stay."""
    whole_word: bool = False
    """Choose whole words (a `Ġ`-token and its continuations) instead of single tokens."""

    def __post_init__(self) -> None:
        for key in ("mask_prob", "mask_token_prob", "random_token_prob"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"masking.{key} must be within [0, 1], got {value}")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError(
                f"masking.mask_token_prob + masking.random_token_prob must be <= 1, got "
                f"{self.mask_token_prob} + {self.random_token_prob}"
            )


def word_start_table(tokenizer: tokenizers.Tokenizer) -> np.ndarray:
    """Boolean array over the vocabulary: True for ids whose token starts with `Ġ` or is special.

    `tokenizer` is a `tokenizers.Tokenizer` (byte-level BPE); ids missing from its vocabulary (holes)
    count as word starts, so they never glue onto a neighbouring word.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    table = np.ones(size, dtype=bool)
    for token, i in vocab.items():
        table[i] = token.startswith("Ġ")
    for i, added in tokenizer.get_added_tokens_decoder().items():
        if added.special:
            table[i] = True
    return table


class Masker:
    """Applies dynamic masking to a batch of packed samples.

    `special_tokens` is the manifest's map (`bos`, `pad`, `eos`, `unk`, `mask` -> id); `word_start` is
    required when `config.whole_word` (a boolean array of length vocab_size, see `word_start_table`).
    """

    def __init__(
        self,
        config: MaskingConfig,
        vocab_size: int,
        special_tokens: dict[str, int],
        word_start: np.ndarray | None = None,
    ):
        self.config = config
        self.vocab_size = vocab_size
        self.mask_id = int(special_tokens["mask"])
        self.is_special = np.zeros(vocab_size, dtype=bool)
        for name, i in special_tokens.items():
            if not 0 <= int(i) < vocab_size:
                raise ValueError(f"special token {name!r} has id {i}, outside the vocabulary of {vocab_size}")
            self.is_special[int(i)] = True
        self.normal_ids = np.flatnonzero(~self.is_special).astype(np.int64)
        if len(self.normal_ids) == 0:
            raise ValueError("the vocabulary has no non-special token to draw random replacements from")
        self.word_start: np.ndarray | None = None
        if config.whole_word:
            if word_start is None:
                raise ValueError("masking.whole_word needs a word_start table (see word_start_table)")
            if len(word_start) != vocab_size:
                raise ValueError(f"word_start has {len(word_start)} entries, the vocabulary {vocab_size}")
            self.word_start = np.asarray(word_start, dtype=bool) | self.is_special

    def __call__(
        self, tokens: np.ndarray, seed: int, epochs: np.ndarray, indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mask a batch `tokens[B, S]`; sample b uses the random stream of (seed, epochs[b], indices[b]).

        Returns `(input_ids, labels)`, both int64 `[B, S]`.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        batch, seq = tokens.shape
        # Draws of a sample: 0 rounds the count, 1..S rank the positions; for a chosen position p,
        # draw 1+S+p decides mask / random / keep and draw 1+2S+p picks the random token.
        keys = sample_keys(seed, epochs, indices)
        u = uniforms(keys[:, None], np.arange(seq + 1)[None, :])
        rounding, rank_u = u[:, 0], u[:, 1:]

        eligible = ~self.is_special[tokens]
        if self.word_start is None:
            chosen = self._choose(rank_u, eligible, rounding)
        else:
            after_special = np.zeros_like(eligible)
            after_special[:, 1:] = ~eligible[:, :-1]
            starts = (self.word_start[tokens] | after_special) & eligible
            chosen_start = self._choose(rank_u, starts, rounding)
            # Each position's word start: the last start at or before it (special tokens are starts).
            is_start = self.word_start[tokens] | after_special
            start_pos = np.maximum.accumulate(np.where(is_start, np.arange(seq), 0), axis=1)
            chosen = np.take_along_axis(chosen_start, start_pos, axis=1) & eligible

        cfg = self.config
        rows, cols = np.nonzero(chosen)
        action = uniforms(keys[rows], 1 + seq + cols)
        to_mask = action < cfg.mask_token_prob
        to_random = ~to_mask & (action < cfg.mask_token_prob + cfg.random_token_prob)
        input_ids = tokens.copy()
        input_ids[rows[to_mask], cols[to_mask]] = self.mask_id
        r_rows, r_cols = rows[to_random], cols[to_random]
        pick = (uniforms(keys[r_rows], 1 + 2 * seq + r_cols) * len(self.normal_ids)).astype(np.int64)
        input_ids[r_rows, r_cols] = self.normal_ids[np.minimum(pick, len(self.normal_ids) - 1)]
        labels = np.where(chosen, tokens, IGNORE_INDEX)
        return input_ids, labels

    def _choose(self, rank_u: np.ndarray, eligible: np.ndarray, rounding: np.ndarray) -> np.ndarray:
        """Per row, exactly floor(mask_prob * n_eligible + rounding) eligible positions: the lowest scores."""
        n_eligible = eligible.sum(axis=1)
        count = np.floor(self.config.mask_prob * n_eligible + rounding).astype(np.int64)
        count = np.minimum(count, n_eligible)
        scores = np.where(eligible, rank_u, 2.0)  # ineligible positions sort last
        ordered = np.sort(scores, axis=1)
        threshold = np.take_along_axis(ordered, np.maximum(count - 1, 0)[:, None], axis=1)
        return eligible & (scores <= threshold) & (count[:, None] > 0)
