"""Byte-level BPE: ids, round trips, early stop, GPT-2 import, HF loading, and the CLI."""
from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers

from core.tokenizer import TokenizerError, document_encoder, load_tokenizer, special_ids, tokenizer_hash
from data_prep.build_tokenizer import BuildTokenizerArgs, build_tokenizer
from data_prep.io import InputError, read_documents
from data_prep.tokenizer import import_gpt2, read_merges, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
GPT2 = REPO / "tests" / "assets" / "gpt2"

ROUND_TRIP = [
    "Hello world", " leading space", "trailing space ", "", " ", "\n\n\n", "\t \t  \r\n \x0b\x0c",
    "multiple    spaces   here", "emoji 😀🎉👩‍👩‍👧‍👦 flags 🇫🇷", "中文字符和日本語のテキスト 한국어",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937", "control \x00\x01\x02\x1b[31m\x7f",
    "zero width \u200b\u200d\ufeff joiner", "RTL \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ", "replacement \ufffd char", "'quotes' \"double\" `back`", "a" * 3000,
    "Tab\tseparated\tvalues\n1\t2\t3", "<s> literal </s> and <mask> and <pad> text",
]


def test_jargon_tokenizer_reaches_8192_with_our_ids(jargon_tokenizer):
    tok = load_tokenizer(jargon_tokenizer)
    assert tok.get_vocab_size() == 8192
    assert special_ids(tok) == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 8191}
    assert [tok.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.id_to_token(8191) == "<mask>"
    files = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
    for name in files:
        assert (jargon_tokenizer / name).is_file(), name
    vocab = json.loads((jargon_tokenizer / "vocab.json").read_text())
    assert len(vocab) == 8192 and vocab["<mask>"] == 8191


def test_encode_adds_bos_eos_and_no_prefix_space(jargon_tokenizer):
    tok = load_tokenizer(jargon_tokenizer)
    enc = tok.encode("hacker")
    assert enc.ids[0] == 0 and enc.ids[-1] == 2
    assert tok.encode("hacker", add_special_tokens=False).tokens[0][0] != "Ġ"  # no added prefix space
    # <mask> swallows the space before it (lstrip), as in RoBERTa
    assert tok.encode("a <mask>", add_special_tokens=False).ids[-1] == 8191


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_document_encoder_round_trips_any_string(jargon_tokenizer, text):
    enc = document_encoder(load_tokenizer(jargon_tokenizer))
    ids = enc.encode(text, add_special_tokens=False).ids
    assert enc.decode(ids, skip_special_tokens=False) == text
    assert 8191 not in ids and not set(ids) & {0, 1, 2, 3}  # text "<mask>" is never a special id


def test_document_encoder_round_trips_random_unicode(jargon_tokenizer):
    enc = document_encoder(load_tokenizer(jargon_tokenizer))
    rng = random.Random(0)
    planes = [(0x20, 0x7F), (0x0, 0x20), (0xA0, 0x2FFF), (0x3000, 0xD7FF),  # no lone surrogates
              (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    for _ in range(200):
        chars = []
        for _ in range(rng.randint(0, 60)):
            lo, hi = rng.choice(planes)
            chars.append(chr(rng.randint(lo, hi)))
        text = "".join(chars)
        assert enc.decode(enc.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_full_tokenizer_round_trips_text_without_special_literals(jargon_tokenizer):
    tok = load_tokenizer(jargon_tokenizer)
    for text in ROUND_TRIP:
        if "<" not in text:
            assert tok.decode(tok.encode(text).ids) == text


def test_training_is_deterministic(tmp_path, jargon_tokenizer, jargon_path):
    build_tokenizer(
        BuildTokenizerArgs(output_dir=str(tmp_path), input=str(jargon_path), vocab_size=8192, progress=False)
    )
    assert tokenizer_hash(tmp_path) == tokenizer_hash(jargon_tokenizer)
    assert (tmp_path / "merges.txt").read_bytes() == (jargon_tokenizer / "merges.txt").read_bytes()


def test_too_little_text_fails_with_the_reachable_size():
    texts = ["the quick brown fox jumps over the lazy dog"] * 50
    with pytest.raises(TokenizerError, match=r"stopped at (\d+) of the 999 .* vocab_size=(\d+)") as err:
        train_tokenizer(texts, vocab_size=1000)
    reachable = int(str(err.value).split("vocab_size=")[1].split()[0])
    tok = train_tokenizer(texts, vocab_size=reachable)  # the suggestion works
    assert special_ids(tok)["mask"] == reachable - 1


def test_vocab_too_small_is_refused():
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_read_merges_keeps_merges_that_start_with_hash():
    merges = read_merges(GPT2 / "vocab.bpe")
    assert len(merges) == 50000
    assert merges[0] == ("Ġ", "t") and ("#", "#") in merges and ("##", "##") in merges


def test_import_gpt2_shifts_ids_by_four(tmp_path):
    gpt2_vocab = json.loads((GPT2 / "encoder.json").read_text())
    raw = Tokenizer(models.BPE(vocab=gpt2_vocab, merges=read_merges(GPT2 / "vocab.bpe")))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert raw.encode("Hello world").ids == [15496, 995]  # GPT-2's own ids

    tok = import_gpt2(GPT2 / "encoder.json", GPT2 / "vocab.bpe")
    assert tok.get_vocab_size() == 50257 + 5
    assert special_ids(tok) == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 50261}
    assert tok.encode("Hello world", add_special_tokens=False).ids == [15500, 999]
    assert tok.encode("Hello world").ids == [0, 15500, 999, 2]
    assert tok.token_to_id("<|endoftext|>") == 50256 + 4

    # our own output has RoBERTa's layout: importing it again keeps every id
    save_tokenizer(tok, tmp_path / "a")
    again = import_gpt2(tmp_path / "a" / "vocab.json", tmp_path / "a" / "merges.txt")
    assert again.get_vocab() == tok.get_vocab()
    save_tokenizer(again, tmp_path / "b")
    assert tokenizer_hash(tmp_path / "a") == tokenizer_hash(tmp_path / "b")


def test_import_refuses_specials_at_other_ids(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "<s>": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="not at RoBERTa's ids"):
        import_gpt2(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_hf_auto_tokenizer_loads_our_directory(jargon_tokenizer):
    import transformers  # a dev dependency: a missing one must fail, not skip
    hf = transformers.AutoTokenizer.from_pretrained(str(jargon_tokenizer))
    ours = load_tokenizer(jargon_tokenizer)
    ids = (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id)
    assert ids == (0, 1, 2, 3, 8191)
    assert hf.cls_token_id == 0 and hf.sep_token_id == 2 and len(hf) == 8192
    for text in ["The Jargon File is a hacker glossary.", "emoji 😀 and 中文", "a <mask> b", " lead"]:
        assert hf(text)["input_ids"] == ours.encode(text).ids, text
    pair = hf("first", "second")["input_ids"]
    assert pair == ours.encode("first", "second").ids and pair.count(2) == 3  # <s> a </s></s> b </s>


def test_hf_auto_tokenizer_loads_an_imported_gpt2_vocabulary(tmp_path):
    import transformers  # a dev dependency: a missing one must fail, not skip
    save_tokenizer(import_gpt2(GPT2 / "encoder.json", GPT2 / "vocab.bpe"), tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf("Hello world")["input_ids"] == [0, 15500, 999, 2]
    assert hf.mask_token_id == 50261 and len(hf) == 50262


def test_cli_trains_and_imports(tmp_path, jargon_path):
    out = tmp_path / "imported"
    r = subprocess.run(
        [sys.executable, "-m", "data_prep.build_tokenizer", f"vocab={GPT2 / 'encoder.json'}",
         f"merges={GPT2 / 'vocab.bpe'}", f"output_dir={out}"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "vocab_size=50262" in r.stdout and load_tokenizer(out).get_vocab_size() == 50262
    r = subprocess.run(
        [sys.executable, "-m", "data_prep.build_tokenizer", f"input={jargon_path}",
         f"output_dir={tmp_path / 't'}", "vocab_size=40000", "progress=false"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert r.returncode == 2 and "vocab_size=" in r.stderr and "Traceback" not in r.stderr


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.build_tokenizer", *argv], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    "argv, message",
    [(["output_dir=x", "input=a", "vocab_size=big"], "Value 'big' of type 'str' could not be converted to Integer"),
     (["output_dir=x", "input=a", "vocab_sise=5"], "Key 'vocab_sise' not in 'BuildTokenizerArgs'"),
     (["input=a"], "output_dir: required; give output_dir=..."),
     (["output_dir=x"], "give either input="),
     (["output_dir=x", "input=a", "progress=maybe"], "Value 'maybe' is not a valid bool"),
     (["output_dir=x", "input=a,b"], "Ambiguous value for argument 'input=a,b'"),
     (["output_dir=x", "input"], "Error parsing override 'input'")],
)
def test_cli_usage_errors_exit_2_naming_the_key(argv, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep.build_tokenizer", *argv], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran: no outputs/, no log file


def test_cli_is_a_hydra_app_lists_and_all(tmp_path, jargon_path):
    """Hydra's list syntax, --cfg job, --help and typed values, as for every command."""
    r = cli("--cfg", "job", "output_dir=o", f"input=[{jargon_path},'{tmp_path}/*.txt']", "vocab_size=50_265",
            "progress=false")
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load(r.stdout)
    assert job["input"] == [str(jargon_path), f"{tmp_path}/*.txt"] and job["vocab_size"] == 50265
    assert job["progress"] is False and job["min_frequency"] == 2  # the schema's default
    r = cli("--help")
    assert r.returncode == 0 and "vocab_size: Ids in all" in r.stdout and "vocab_size: 50265" in r.stdout
    (tmp_path / "a.txt").write_text("one two three\n\nfour five six\n")
    (tmp_path / "b.txt").write_text("seven eight\n")
    r = cli(f"input=[{tmp_path}/a.txt,{tmp_path}/b.txt]", f"output_dir={tmp_path / 'tok'}", "vocab_size=270",
            "min_frequency=1", "progress=false")
    assert r.returncode == 0, r.stderr
    assert "input_files=2" in r.stdout and "documents=3" in r.stdout


def test_txt_and_jsonl_gz_train_the_same_tokenizer_and_max_bytes_samples(tmp_path, jargon_path):
    docs = list(read_documents(jargon_path))[:3000]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    hashes = []
    for name in ("a.txt", "a.jsonl.gz"):
        out = tmp_path / name.replace(".", "_")
        summary = build_tokenizer(BuildTokenizerArgs(output_dir=str(out), input=str(tmp_path / name),
                                                     vocab_size=1000, progress=False))
        assert summary["documents"] == 3000
        hashes.append(tokenizer_hash(out))
    assert hashes[0] == hashes[1]
    sampled = BuildTokenizerArgs(output_dir=str(tmp_path / "s"), input=str(tmp_path / "a.txt"),
                                 vocab_size=1000, max_bytes=50_000, progress=False)
    summary = build_tokenizer(sampled)
    assert 50_000 <= summary["bytes"] < 52_000 and summary["documents"] < 3000
    assert tokenizer_hash(tmp_path / "s") != hashes[0]


def test_join_lines_trains_on_the_joined_text(tmp_path, jargon_path):
    """join_lines=true (the CLI setting): the wrapped lines' "\\n   " no longer make tokens of their own."""
    docs = list(read_documents(jargon_path))[:3000]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    vocabs = {}
    for join in ("false", "true"):
        out = tmp_path / f"tok_{join}"
        r = cli(f"input={tmp_path / 'a.txt'}", f"output_dir={out}", "vocab_size=1000", f"join_lines={join}",
                "progress=false")
        assert r.returncode == 0, r.stderr
        # merged tokens holding Ċ, the byte-level BPE's "\\n" (the single byte is in every vocabulary)
        vocabs[join] = [t for t in load_tokenizer(out).get_vocab() if "Ċ" in t and len(t) > 1]
    assert vocabs["false"] and not vocabs["true"]
    assert cli("--help").stdout.count("join_lines: Join the lines of each .txt document") == 1


def test_missing_or_empty_input_fails_clearly(tmp_path):
    with pytest.raises(InputError, match="nope.txt: no such file"):
        build_tokenizer(BuildTokenizerArgs(output_dir=str(tmp_path / "o"), input=str(tmp_path / "nope.txt")))
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    for vocab_size in (8192, 261):  # 261 was once suggested for it, and then built a tokenizer of nothing
        with pytest.raises(InputError, match=r"the input holds no documents \(1 files"):
            build_tokenizer(BuildTokenizerArgs(output_dir=str(tmp_path / "o"), input=str(tmp_path / "blank.txt"),
                                               vocab_size=vocab_size, progress=False))
    assert not (tmp_path / "o" / "tokenizer.json").exists()
    r = cli(f"input={tmp_path / 'blank.txt'}", f"output_dir={tmp_path / 'o'}", "vocab_size=261", "progress=false")
    assert r.returncode == 2 and "no documents" in r.stderr
