"""Packing, block index cache, sampling across ranks, resume, and corpus checks of `pretrain.data`."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import UnresumableError  # the trainer's exit 2 on a state it cannot continue from
from core.model import IGNORE_INDEX
from data_prep.corpus import Corpus, write_manifest
from data_prep.shards import CorpusError, ShardWriter, token_dtype
from pretrain.config import ConfigError
from pretrain.data import (
    PackedBlocks,
    TrainLoader,
    ValidLoader,
    block_index,
    check_corpus,
    load_block_index,
    word_starts,
)
from pretrain.masking import MaskingConfig, word_start_table

VOCAB = 300
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": VOCAB - 1}
BOS, PAD, EOS = 0, 1, 2


def write_corpus(
    root: Path,
    docs: list[np.ndarray],
    docs_per_shard: int = 7,
    vocab_size: int = VOCAB,
    special_tokens: dict[str, int] | None = None,
    tokenizer_hash: str = "test-tokenizer",
    valid_docs: list[np.ndarray] | None = None,
) -> Path:
    """A tiny corpus on disk, through the real writers: `train` (and `valid`) split in several shards."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, split_docs in (("train", docs), ("valid", valid_docs)):
        if split_docs is None:
            continue
        entries = []
        for s, i in enumerate(range(0, len(split_docs), docs_per_shard)):
            writer = ShardWriter(root, f"{split}-00000-{s:05d}", token_dtype(vocab_size))
            for doc in split_docs[i : i + docs_per_shard]:
                writer.add(doc)
            entries.append(writer.close())
        splits[split] = entries
    write_manifest(
        root,
        tokenizer_hash=tokenizer_hash,
        vocab_size=vocab_size,
        special_tokens=special_tokens or SPECIALS,
        splits=splits,
    )
    return root


def random_docs(n: int, seed: int = 0, max_len: int = 90) -> list[np.ndarray]:
    """Documents of non-special ids; document d's tokens are distinguishable by position in the stream."""
    rng = np.random.default_rng(seed)
    return [rng.integers(4, VOCAB - 1, size=int(rng.integers(1, max_len))) for _ in range(n)]


def stream(docs: list[np.ndarray]) -> np.ndarray:
    """The reference FULL-SENTENCES stream: documents joined by </s>."""
    parts = []
    for i, d in enumerate(docs):
        if i:
            parts.append(np.array([EOS]))
        parts.append(d)
    return np.concatenate(parts).astype(np.int64)


@pytest.fixture
def corpus_docs(tmp_path: Path) -> tuple[Corpus, list[np.ndarray]]:
    docs = random_docs(40)
    return Corpus.open(write_corpus(tmp_path / "corpus", docs), "train"), docs


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(x[key], y[key]), key


# --- packing ---------------------------------------------------------------------------------------


def test_full_sentences_epoch_covers_stream_once(corpus_docs):
    corpus, docs = corpus_docs
    seq = 32
    ds = PackedBlocks(corpus, seq, "full_sentences")
    samples = [ds[(0, b, b)][0] for b in range(len(ds))]
    body = []
    for i, s in enumerate(samples):
        assert len(s) == seq and s[0] == BOS
        real = s[s != PAD] if i == len(samples) - 1 else s
        if i < len(samples) - 1:
            assert not (s == PAD).any(), "only the last block may be short"
        assert real[-1] == EOS
        body.append(real[1:-1])
    np.testing.assert_array_equal(np.concatenate(body), stream(docs))


def test_doc_sentences_never_crosses_a_document(corpus_docs):
    corpus, docs = corpus_docs
    seq = 16
    ds = PackedBlocks(corpus, seq, "doc_sentences")
    rebuilt: list[np.ndarray] = []
    for b in range(len(ds)):
        s = ds[(0, b, b)][0]
        assert len(s) == seq and s[0] == BOS
        real = s[s != PAD]
        assert real[-1] == EOS and not (real[1:-1] == EOS).any(), "a block holds a document boundary"
        rebuilt.append(real[1:-1])
    # blocks in stream order, concatenated per document, give back each document
    lengths = [len(d) for d in docs]
    expected_blocks = sum(-(-n // (seq - 2)) for n in lengths)
    assert len(rebuilt) == expected_blocks
    np.testing.assert_array_equal(np.concatenate(rebuilt), np.concatenate(docs))
    i = 0
    for d in docs:
        n = -(-len(d) // (seq - 2))
        np.testing.assert_array_equal(np.concatenate(rebuilt[i : i + n]), d)
        i += n


def test_empty_and_long_documents_across_shards(tmp_path):
    """One document per shard (every block crosses shards), an empty document, one of many blocks."""
    rng = np.random.default_rng(2)
    docs = [rng.integers(4, VOCAB - 1, size=n) for n in (3, 0, 100, 1, 29, 0, 0, 7)]
    corpus = Corpus.open(write_corpus(tmp_path / "c", docs, docs_per_shard=1), "train")
    full = PackedBlocks(corpus, 16, "full_sentences")
    body = [s[1 : 1 + int((s != PAD).sum()) - 2] for s in (full[(0, b, b)][0] for b in range(len(full)))]
    np.testing.assert_array_equal(np.concatenate(body), stream(docs))
    per_doc = PackedBlocks(corpus, 16, "doc_sentences")
    samples = (per_doc[(0, b, b)][0] for b in range(len(per_doc)))
    body = [s[1 : 1 + int((s != PAD).sum()) - 2] for s in samples]
    assert len(body) == sum(-(-len(d) // 14) for d in docs)
    np.testing.assert_array_equal(np.concatenate(body), np.concatenate(docs))


def test_block_index_vectorised_matches_definition():
    lengths = np.array([5, 0, 12, 3, 1])
    full = block_index(lengths, 4, "full_sentences")
    stream_len = lengths.sum() + len(lengths) - 1
    assert full[:, 1].sum() == stream_len and (full[:-1, 1] == 4).all()
    doc = block_index(lengths, 4, "doc_sentences")
    # doc 0: 5 -> 4+1; doc 1: empty; doc 2 (stream start 7): 12 -> 3x4; doc 3 (start 20): 3; doc 4 (24): 1
    np.testing.assert_array_equal(doc, [[0, 4], [4, 1], [7, 4], [11, 4], [15, 4], [20, 3], [24, 1]])


def test_block_index_cache_written_and_reused(corpus_docs):
    corpus, _ = corpus_docs
    blocks, seps = load_block_index(corpus, 32, "full_sentences")
    files = sorted(p.name for p in (corpus.path / "cache").iterdir())
    assert len(files) == 2 and all(f.endswith(".npy") for f in files)
    again, _ = load_block_index(corpus, 32, "full_sentences")
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, blocks)
    load_block_index(corpus, 64, "doc_sentences")
    assert len(list((corpus.path / "cache").iterdir())) == 3  # separators are shared


def test_unwritable_cache_computes_in_memory(tmp_path):
    """A corpus whose cache cannot be written (read-only mount; here: `cache` is a file) still loads."""
    docs = random_docs(10)
    root = write_corpus(tmp_path / "ro", docs)
    (root / "cache").write_text("not a directory")
    corpus = Corpus.open(root, "train")
    blocks, seps = load_block_index(corpus, 32, "full_sentences")
    assert not isinstance(blocks, np.memmap) and len(blocks) == -(-len(stream(docs)) // 30)
    assert len(seps) == len(docs) - 1
    ds = PackedBlocks(corpus, 32, "full_sentences")
    np.testing.assert_array_equal(ds[(0, 0, 0)][0][1:31], stream(docs)[:30])


def test_dataset_pickles_without_arrays(corpus_docs):
    corpus, _ = corpus_docs
    ds = PackedBlocks(corpus, 32, "full_sentences")
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # no token or index array travels to a worker
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[(0, 3, 3)][0], ds[(0, 3, 3)][0])


# --- loader ----------------------------------------------------------------------------------------


def test_train_loader_batches(corpus_docs):
    corpus, _ = corpus_docs
    loader = TrainLoader(corpus, seq_len=32, micro_batch_size=4, seed=1, num_workers=0)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for v in batch.values():
        assert v.dtype == torch.int64 and v.shape == (4, 32)
    masked = batch["labels"] != IGNORE_INDEX
    assert masked.any()
    assert (batch["attention_mask"][masked] == 1).all()
    assert loader.state_dict()["samples_in_epoch"] == 4


def unmasked(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """The packed samples of a batch before masking (labels hold the original of every changed token)."""
    original = torch.where(batch["labels"] == IGNORE_INDEX, batch["input_ids"], batch["labels"])
    return [tuple(row.tolist()) for row in original]


def test_epoch_is_a_permutation_and_epochs_differ(corpus_docs):
    corpus, _ = corpus_docs
    loader = TrainLoader(corpus, seq_len=32, micro_batch_size=1, seed=3, num_workers=0)
    n = loader.samples_per_epoch
    ds = loader.dataset
    blocks = sorted(tuple(ds[(0, b, b)][0].tolist()) for b in range(len(ds)))
    got = [s for b in take(loader, 2 * n) for s in unmasked(b)]
    assert loader.epoch == 2
    assert sorted(got[:n]) == blocks and sorted(got[n:]) == blocks  # every block once per epoch
    assert got[:n] != got[n:], "two epochs in the same order"


def test_two_ranks_equal_one_rank(corpus_docs):
    corpus, _ = corpus_docs
    kw = dict(seq_len=32, seed=5, num_workers=0)
    one = take(TrainLoader(corpus, micro_batch_size=4, **kw), 3)
    r0 = take(TrainLoader(corpus, micro_batch_size=2, rank=0, world_size=2, **kw), 3)
    r1 = take(TrainLoader(corpus, micro_batch_size=2, rank=1, world_size=2, **kw), 3)
    # one process sees global positions 0..11 in order; rank r sees positions r, r+2, ...
    for key in ("input_ids", "attention_mask", "labels"):
        full = torch.cat([b[key] for b in one])
        ranks = torch.stack([torch.cat([b[key] for b in r0]), torch.cat([b[key] for b in r1])], dim=1)
        assert torch.equal(full, ranks.reshape(full.shape)), key


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(corpus_docs, workers):
    corpus, _ = corpus_docs
    kw = dict(seq_len=32, micro_batch_size=3, seed=7, num_workers=workers)
    ref = TrainLoader(corpus, **kw)
    total = ref.samples_per_epoch // 3 + 4  # crosses into the second epoch
    straight = take(ref, total)
    first = TrainLoader(corpus, **kw)
    take(first, 5)
    state = first.state_dict()
    resumed = TrainLoader(corpus, **kw)
    resumed.load_state_dict(state)
    assert_same(take(resumed, total - 5), straight[5:])


def test_resume_reads_no_skipped_sample(corpus_docs):
    corpus, _ = corpus_docs
    kw = dict(seq_len=32, micro_batch_size=2, seed=0, num_workers=0)
    reads = []
    for epoch, position in ((0, 0), (0, 60), (5, 31)):
        loader = TrainLoader(corpus, **kw)
        state = loader.state_dict() | {"epoch": epoch, "samples_in_epoch": position}
        loader.load_state_dict(state)
        take(loader, 1)
        reads.append(loader.dataset.reads)
    assert reads == [2, 2, 2]  # one micro-batch read, whatever the position


def test_load_state_dict_closes_the_live_iterator(corpus_docs):
    corpus, _ = corpus_docs
    kw = dict(seq_len=32, micro_batch_size=2, seed=4, num_workers=2)
    straight = take(TrainLoader(corpus, **kw), 6)
    loader = TrainLoader(corpus, **kw)
    it = iter(loader)
    early = [next(it) for _ in range(2)]
    state = loader.state_dict()
    later = [next(it) for _ in range(3)]
    assert_same(early + later, straight[:5])
    loader.load_state_dict(state)
    with pytest.raises(StopIteration):
        next(it)
    assert loader.state_dict() == state
    assert_same(take(loader, 4), straight[2:6])


def test_resume_refuses_incompatible_state(corpus_docs):
    corpus, _ = corpus_docs
    state = TrainLoader(corpus, seq_len=32, micro_batch_size=2, seed=0, num_workers=0).state_dict()
    other = TrainLoader(corpus, seq_len=32, micro_batch_size=2, seed=1, num_workers=0)
    with pytest.raises(ValueError, match=r"seed=0.*seed=1"):
        other.load_state_dict(state)
    two = TrainLoader(corpus, seq_len=32, micro_batch_size=2, seed=0, world_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"global_batch=2, this run has global_batch=4"):
        two.load_state_dict(state)  # another global batch: another order


# --- elastic resume: the order depends on the global batch, not on the world size -----------------

G, MICRO = 12, 2  # global batch 12: 2 ranks x 3 micro-batches, 1 x 6, 3 x 2


def global_steps(corpus: Corpus, world_size: int, steps: int, state: dict | None = None,
                 seed: int = 9) -> tuple[list[list[tuple]], list[dict]]:
    """`steps` optimizer steps of `world_size` ranks (from `state`), as each step's global samples in
    position order ((input_ids, labels) of each, so masks are compared too), and the ranks' states."""
    accum = G // (MICRO * world_size)
    loaders = [TrainLoader(corpus, seq_len=32, micro_batch_size=MICRO, seed=seed, rank=r, world_size=world_size,
                           num_workers=0, global_batch=G) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    per_rank = [[(tuple(ids.tolist()), tuple(lab.tolist())) for b in take(loader, steps * accum)
                 for ids, lab in zip(b["input_ids"], b["labels"])] for loader in loaders]
    out = []
    for k in range(steps):
        chunk = [samples[k * G // world_size : (k + 1) * G // world_size] for samples in per_rank]
        out.append([chunk[i % world_size][i // world_size] for i in range(G)])  # rank r holds r, r+W, ...
    return out, [loader.state_dict() for loader in loaders]


def test_an_epoch_is_cut_to_a_multiple_of_the_global_batch(corpus_docs):
    corpus, _ = corpus_docs
    one = TrainLoader(corpus, seq_len=32, micro_batch_size=MICRO, num_workers=0, global_batch=G)
    num_blocks = len(one.dataset)
    assert num_blocks % G, "the corpus should not be a multiple of G: the cut would not be tested"
    assert one.epoch_length == num_blocks // G * G
    three = TrainLoader(corpus, seq_len=32, micro_batch_size=MICRO, rank=2, world_size=3, num_workers=0,
                        global_batch=G)
    assert three.samples_per_epoch * 3 == one.samples_per_epoch == one.epoch_length


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_resume_on_any_world_size_reads_the_uninterrupted_samples_and_masks(corpus_docs, world_size):
    """2 ranks stop after k steps; 1, 2 or 3 ranks go on and read what the uninterrupted 2-rank run reads
    at steps k+1.., samples and masks, across an epoch boundary."""
    corpus, _ = corpus_docs
    steps_per_epoch = len(PackedBlocks(corpus, 32, "full_sentences")) // G
    k, more = steps_per_epoch - 2, 4  # ends two steps into the next epoch
    straight, _ = global_steps(corpus, 2, k + more)
    _, states = global_steps(corpus, 2, k)
    assert all(s == states[0] for s in states), "the loader state differs between ranks"
    assert states[0]["version"] == 2 and states[0]["samples_in_epoch"] == k * G
    resumed, after = global_steps(corpus, world_size, more, states[0])
    assert resumed == straight[k:]
    assert after[0]["epoch"] == 1 and after[0]["samples_in_epoch"] == (k + more - steps_per_epoch) * G


def test_a_position_the_ranks_cannot_split_is_refused(corpus_docs):
    corpus, _ = corpus_docs
    _, states = global_steps(corpus, 1, 1)
    three = TrainLoader(corpus, seq_len=32, micro_batch_size=MICRO, seed=9, world_size=3, num_workers=0,
                        global_batch=G)
    with pytest.raises(ValueError, match=r"samples_in_epoch=10 is not a multiple of world_size 3"):
        three.load_state_dict(states[0] | {"samples_in_epoch": 10})


def version_1(state: dict, per_rank: int, epoch: int = 0) -> dict:
    """A loader state as the code before elastic resume saved it: a position per rank, no global batch."""
    return {"epoch": epoch, "samples_in_epoch": per_rank, "seed": state["seed"], "world_size": state["world_size"],
            "seq_len": state["seq_len"], "packing": state["packing"], "num_blocks": state["num_blocks"]}


def test_a_version_1_state_resumes_on_its_world_size_where_the_orders_agree(corpus_docs):
    corpus, _ = corpus_docs
    straight, states = global_steps(corpus, 2, 5)
    old = version_1(states[0], per_rank=2 * G // 2)  # after step 2 of 2 ranks
    resumed, _ = global_steps(corpus, 2, 3, old)
    assert resumed == straight[2:]


def test_a_version_1_state_is_refused_where_the_orders_differ(corpus_docs):
    corpus, _ = corpus_docs
    _, states = global_steps(corpus, 2, 1)
    num_blocks = states[0]["num_blocks"]
    assert num_blocks // 2 * 2 != num_blocks // G * G, "old and new epoch lengths must differ here"
    two = TrainLoader(corpus, seq_len=32, micro_batch_size=MICRO, seed=9, world_size=2, num_workers=0,
                      global_batch=G)
    with pytest.raises(UnresumableError, match=r"version-1 .* epoch 1, .*differ .*trainer.resume=none"):
        two.load_state_dict(version_1(states[0], per_rank=6, epoch=1))
    with pytest.raises(ValueError, match=r"version-1 .*epoch 0, .*differ"):  # the tail epoch 0 had, not now
        two.load_state_dict(version_1(states[0], per_rank=num_blocks // G * G // 2))
    one = TrainLoader(corpus, seq_len=32, micro_batch_size=MICRO, seed=9, num_workers=0, global_batch=G)
    with pytest.raises(ValueError, match=r"version-1 .*world_size=2.*only on its own world size.*world_size=1"):
        one.load_state_dict(version_1(states[0], per_rank=6))


def test_workers_give_the_same_batches(corpus_docs):
    corpus, _ = corpus_docs
    kw = dict(seq_len=32, micro_batch_size=4, seed=11, masking=MaskingConfig(whole_word=False))
    in_process = take(TrainLoader(corpus, num_workers=0, **kw), 4)
    assert_same(in_process, take(TrainLoader(corpus, num_workers=2, **kw), 4))


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_leaves_torchs_global_rng_alone(corpus_docs, workers):
    """The loader's iterator seeds its workers from its own generator: the trainer's dropout stream (torch's
    global RNG) is the same whether or not a DataLoader iterator was (re)created, as on resume."""
    corpus, _ = corpus_docs
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = TrainLoader(corpus, seq_len=32, micro_batch_size=3, seed=7, num_workers=workers)
    take(loader, 2)
    take(loader, 2)  # a second iterator, continuing
    assert torch.equal(torch.get_rng_state(), before)


def test_word_starts_from_the_tokenizer_only_for_whole_word_masking(jargon_tokenizer):
    from core.tokenizer import load_tokenizer

    assert word_starts(MaskingConfig(whole_word=False), None) is None  # no tokenizer needed, none read
    assert word_starts(MaskingConfig(whole_word=False), "/nonexistent") is None
    table = word_starts(MaskingConfig(whole_word=True), jargon_tokenizer)
    assert table is not None and np.array_equal(table, word_start_table(load_tokenizer(jargon_tokenizer)))
    assert 0 < table.mean() < 1  # some tokens start words, some continue them
    with pytest.raises(ConfigError, match="data.masking.whole_word=true needs data.tokenizer"):
        word_starts(MaskingConfig(whole_word=True), None)


def test_valid_loader_is_fixed_and_finite(tmp_path):
    root = write_corpus(tmp_path / "c", random_docs(12), valid_docs=random_docs(8, seed=1))  # 11 blocks
    valid = Corpus.open(root, "valid")
    loader = ValidLoader(valid, seq_len=32, batch_size=4, seed=0)
    a, b = list(loader), list(loader)
    assert len(a) == len(loader) and len(a) >= 2
    assert_same(a, b)
    # two ranks: rank r has samples r, r+2, ... of the one-rank order, with the same masks; both ranks
    # get the same number of samples (an odd last block is left out)
    halves = [list(ValidLoader(valid, 32, 4, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    for key in ("input_ids", "attention_mask", "labels"):
        full = torch.cat([x[key] for x in a])
        even = len(full) // 2 * 2
        assert even == 10
        for r in (0, 1):
            assert torch.equal(torch.cat([x[key] for x in halves[r]]), full[r:even:2]), key
    other_seed = list(ValidLoader(valid, 32, 4, seed=1))
    assert not torch.equal(other_seed[0]["labels"], a[0]["labels"])


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [({"packing": "sentences"}, "data.packing must be one of"), ({"seq_len": 2}, "seq_len must be >= 3"),
     ({"rank": 2, "world_size": 2}, "rank 2 is not within world_size 2"),
     ({"seed": -1}, "seed must be >= 0")],
)
def test_bad_loader_settings_refused(corpus_docs, kwargs, message):
    corpus, _ = corpus_docs
    settings = dict(seq_len=32, micro_batch_size=2, num_workers=0) | kwargs
    with pytest.raises(ValueError, match=message):
        TrainLoader(corpus, **settings)


def test_check_corpus_refuses_mismatches(tmp_path):
    docs = random_docs(5)
    good = Corpus.open(write_corpus(tmp_path / "good", docs), "train")
    check_corpus(good, VOCAB, "test-tokenizer")
    with pytest.raises(CorpusError, match=rf"{VOCAB}.*512"):
        check_corpus(good, 512)
    with pytest.raises(CorpusError, match="test-tokenizer.*other-hash"):
        check_corpus(good, VOCAB, "other-hash")
    swapped = {**SPECIALS, "bos": 2, "eos": 0}
    bad = Corpus.open(write_corpus(tmp_path / "bad", docs, special_tokens=swapped), "train")
    with pytest.raises(CorpusError, match=r"special_tokens.bos is 2.*bos = 0"):
        check_corpus(bad, VOCAB)
    wrong_mask = {**SPECIALS, "mask": 4}
    bad = Corpus.open(write_corpus(tmp_path / "bad2", docs, special_tokens=wrong_mask), "train")
    with pytest.raises(CorpusError, match=rf"special_tokens.mask is 4.*mask = {VOCAB - 1}"):
        check_corpus(bad, VOCAB)
