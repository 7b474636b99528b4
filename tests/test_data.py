"""CPU tests of the data pipeline (dsparse.data): sources, tokenizer cache, packing, loaders."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsparse.data import (
    EvalLoader,
    PackedBlocks,
    TrainLoader,
    build_data,
    default_corpus,
    load_text_dataset,
    load_tokenizer,
    pack_corpus,
    stdlib_files,
    trained_tokenizer,
)
from dsparse.data import tokenizer as tokmod
from dsparse.data.cache import cached_dir
from dsparse.data.corpus import split_files
from dsparse.data.sources import fingerprint

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 80)))) + f" doc{i}." for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    _write_jsonl(d / "part0.jsonl", [{"text": t, "id": i} for i, t in enumerate(_docs(60))])
    _write_jsonl(d / "part1.jsonl", [{"text": t, "id": i} for i, t in enumerate(_docs(60, seed=1))])
    return d


# ---------------------------------------------------------------- corpus and sources


def test_default_corpus_deterministic_and_split():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.split("/")[:-1])
    train, val = split_files(files)
    assert not set(train) & set(val) and len(train) + len(val) == len(files)
    assert 0.005 < len(val) / len(files) < 0.05
    a, b = default_corpus(max_mb=0.3), default_corpus(max_mb=0.3)
    for split in ("train", "validation"):
        assert list(a[split]["text"]) == list(b[split]["text"])
        assert fingerprint(a[split]) == fingerprint(b[split])
        assert a[split].column_names == ["text"] and len(a[split]) > 0
    train_bytes = sum(len(t.encode()) for t in a["train"]["text"])
    assert train_bytes <= 0.3e6 or len(a["train"]) == 1
    assert not set(a["train"]["text"]) & set(a["validation"]["text"])
    bigger = default_corpus(max_mb=0.6)
    assert fingerprint(bigger["train"]) != fingerprint(a["train"])
    assert list(bigger["validation"]["text"]) == list(a["validation"]["text"])  # split does not depend on the cap


def test_local_jsonl_directory_is_split_deterministically(corpus_dir, tmp_path):
    a = load_text_dataset(str(corpus_dir), cache_dir=tmp_path / "hf")
    b = load_text_dataset(str(corpus_dir), cache_dir=tmp_path / "hf")
    assert a["train"].column_names == ["text"] and a["validation"].column_names == ["text"]
    assert list(a["train"]["text"]) == list(b["train"]["text"]) and fingerprint(a["train"]) == fingerprint(b["train"])
    train, val = set(a["train"]["text"]), set(a["validation"]["text"])
    assert val and not train & val and train | val == set(_docs(60)) | set(_docs(60, seed=1))


def test_local_validation_file_and_formats(tmp_path):
    d = tmp_path / "jsonl"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", [{"text": t} for t in _docs(20)] + [{"text": "   "}])
    _write_jsonl(d / "validation.jsonl", [{"text": t} for t in _docs(5, seed=9)])
    ds = load_text_dataset(str(d), cache_dir=tmp_path / "hf")
    assert list(ds["validation"]["text"]) == _docs(5, seed=9)
    assert list(ds["train"]["text"]) == _docs(20)  # blank document filtered

    pq.write_table(pa.table({"body": _docs(30), "n": list(range(30))}), tmp_path / "data.parquet")
    ds = load_text_dataset(str(tmp_path / "data.parquet"), text_column="body", cache_dir=tmp_path / "hf")
    assert set(ds["train"]["text"]) | set(ds["validation"]["text"]) == set(_docs(30))

    (tmp_path / "book.txt").write_text("\n\n".join(_docs(40)) + "\n")
    ds = load_text_dataset(str(tmp_path / "book.txt"), cache_dir=tmp_path / "hf")
    got = set(ds["train"]["text"]) | set(ds["validation"]["text"])
    assert {t.strip() for t in got} == set(_docs(40)) and len(ds["validation"]) >= 1

    capped = load_text_dataset(str(tmp_path / "book.txt"), max_mb=0.001, cache_dir=tmp_path / "hf")
    assert sum(len(t.encode()) for t in capped["train"]["text"]) <= 1000


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_error_messages(tmp_path, monkeypatch):
    _one_line_error("does not exist", load_text_dataset, str(tmp_path / "missing.jsonl"))
    _one_line_error("does not exist", load_text_dataset, "./no/such/dir")
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"content": "x", "meta": 1}])
    msg = _one_line_error("no 'text' column", load_text_dataset, str(bad), cache_dir=tmp_path / "hf")
    assert "content" in msg and "meta" in msg
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  \n"}])
    _one_line_error("no non-empty text", load_text_dataset, str(empty), cache_dir=tmp_path / "hf")
    (tmp_path / "x.csv").write_text("a,b\n")
    _one_line_error("unsupported extension", load_text_dataset, str(tmp_path / "x.csv"))
    (tmp_path / "nothing").mkdir()
    _one_line_error("has no .txt", load_text_dataset, str(tmp_path / "nothing"))
    # a hub name is attempted; with the Hub unreachable (offline here, so it fails fast) one line comes back
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    msg = _one_line_error("neither a local path nor a reachable hub dataset", load_text_dataset, "nobody/no-such-ds")
    assert msg.startswith("dataset 'nobody/no-such-ds' is neither a local path nor a reachable hub dataset: ")
    # online mode but an endpoint that refuses connections: the quick reachability check answers
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    msg = _one_line_error("cannot connect to http://127.0.0.1:9", load_text_dataset, "nobody/no-such-ds:cfg")
    assert msg.startswith("dataset 'nobody/no-such-ds:cfg' is neither a local path nor a reachable hub dataset: ")
    (tmp_path / "notok").mkdir()
    _one_line_error("no tokenizer files", load_tokenizer, str(tmp_path / "notok"))
    _one_line_error("could not be loaded", load_tokenizer, "nobody/no-such-tokenizer")
    _one_line_error("seq_len must be at least 2", build_data, "default", seq_len=1, cache_dir=tmp_path / "c")


# ---------------------------------------------------------------- tokenizer and packing


def test_tokenizer_trained_once_and_cached(corpus_dir, tmp_path, monkeypatch):
    calls = []
    real = tokmod.train_bpe
    monkeypatch.setattr(tokmod, "train_bpe", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds = load_text_dataset(str(corpus_dir), cache_dir=tmp_path / "hf")
    t1 = trained_tokenizer(ds["train"], tmp_path / "cache", vocab_size=300)
    saved = next((tmp_path / "cache" / "tokenizers").glob("bpe300-*"))
    mtime = (saved / "tokenizer.json").stat().st_mtime_ns
    t2 = trained_tokenizer(ds["train"], tmp_path / "cache", vocab_size=300)
    assert len(calls) == 1 and (saved / "tokenizer.json").stat().st_mtime_ns == mtime
    assert t1.get_vocab() == t2.get_vocab() and len(t1) <= 300
    assert t1.eos_token_id == 0 and t1.pad_token_id == 1 and t1.eos_token == "<|endoftext|>"
    text = "alpha beta gamma\n    delta"
    assert t1.decode(t1(text, add_special_tokens=False)["input_ids"]) == text
    trained_tokenizer(ds["train"], tmp_path / "cache", vocab_size=320)
    assert len(calls) == 2  # new key, new training
    loaded = load_tokenizer(str(saved))  # a tokenizer directory loads as-is
    assert loaded.get_vocab() == t1.get_vocab() and loaded.pad_token_id == 1


def test_cache_entry_built_once_under_concurrency(tmp_path):
    builds = []

    def build(tmp):
        builds.append(1)
        time.sleep(0.2)
        (tmp / "done").write_text("ok")

    results = []
    threads = [threading.Thread(target=lambda: results.append(cached_dir(tmp_path, "entry", build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and sum(built for _, built in results) == 1
    assert (tmp_path / "entry" / "done").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["entry"]  # no leftover temp dirs


def test_packing_lengths_and_content(corpus_dir, tmp_path):
    ds = load_text_dataset(str(corpus_dir), cache_dir=tmp_path / "hf")
    tok = trained_tokenizer(ds["train"], tmp_path / "cache", vocab_size=300)
    seq_len = 16
    packed = pack_corpus(ds, tok, seq_len, tmp_path / "cache")
    for split, data in (("train", packed.train), ("validation", packed.validation)):
        blocks = PackedBlocks(data)
        arr = blocks[np.arange(len(blocks))]
        assert arr.shape == (len(data), seq_len) and arr.dtype == np.int32
        stream = []
        for text in ds[split]["text"]:
            stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        meta = packed.meta[split]
        assert meta["tokens"] == len(stream) and meta["blocks"] == len(stream) // seq_len
        assert 0 <= meta["dropped_tokens"] < seq_len
        assert arr.reshape(-1).tolist() == stream[: len(blocks) * seq_len]
    again = pack_corpus(ds, tok, seq_len, tmp_path / "cache")
    entries = [p.name for p in (tmp_path / "cache" / "packed").iterdir() if p.is_dir()]
    assert again.path == packed.path and entries == [packed.path.name]
    _one_line_error("fewer than seq_len", pack_corpus, ds, tok, 100_000, tmp_path / "cache")


# ---------------------------------------------------------------- loaders


def _blocks(n: int, seq_len: int = 4) -> PackedBlocks:
    return PackedBlocks(np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len))


def _ids(batch) -> list[int]:
    return (batch["input_ids"][:, 0] // batch["input_ids"].shape[1]).tolist()


def _global_stream(loaders, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        for loader in loaders:  # rank order
            out += _ids(next(loader))
    return out


def test_batches_are_shaped_and_labelled():
    loader = TrainLoader(_blocks(10, seq_len=8), micro_batch_size=3, seed=1)
    batch = next(loader)
    assert batch["input_ids"].shape == (3, 8) and batch["input_ids"].dtype.is_floating_point is False
    assert str(batch["input_ids"].dtype) == "torch.int64"
    assert batch["labels"].equal(batch["input_ids"])


def test_ranks_disjoint_and_cover_each_epoch():
    n, mb, world = 36, 3, 2
    blocks = _blocks(n)
    ranks = [TrainLoader(blocks, mb, r, world, seed=7) for r in range(world)]
    steps = n // (mb * world)
    per_rank = [[i for _ in range(steps) for i in _ids(next(loader))] for loader in ranks]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))
    assert ranks[0].epoch == 1 and ranks[0].state_dict()["consumed_samples"] == n
    second = [i for _ in range(steps) for loader in ranks for i in _ids(next(loader))]
    assert sorted(second) == list(range(n)) and second != per_rank[0] + per_rank[1]  # new permutation
    # uneven epoch length: the stream still visits every block once per epoch, nothing dropped
    odd = [TrainLoader(_blocks(37), mb, r, world, seed=7) for r in range(world)]
    stream = _global_stream(odd, 13)  # 78 samples: two whole epochs and 4 more
    assert sorted(stream[:37]) == list(range(37)) and sorted(stream[37:74]) == list(range(37))
    seeded = [TrainLoader(blocks, mb, r, world, seed=8) for r in range(world)]
    reference = [TrainLoader(blocks, mb, r, world, seed=7) for r in range(world)]
    assert _global_stream(seeded, steps) != _global_stream(reference, steps)


def test_resume_continues_exactly():
    blocks, mb, world, k, total = _blocks(23), 3, 2, 7, 20
    reference = [TrainLoader(blocks, mb, r, world, seed=3) for r in range(world)]
    ref_batches = [[_ids(next(loader)) for loader in reference] for _ in range(total)]
    first = [TrainLoader(blocks, mb, r, world, seed=3) for r in range(world)]
    got = [[_ids(next(loader)) for loader in first] for _ in range(k)]
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1] and states[0]["consumed_samples"] == k * mb * world
    state = json.loads(json.dumps(states[0]))  # checkpoints store plain data
    resumed = [TrainLoader(blocks, mb, r, world, seed=3) for r in range(world)]
    for loader in resumed:
        loader.load_state_dict(state)
    got += [[_ids(next(loader)) for loader in resumed] for _ in range(total - k)]
    assert got == ref_batches


def test_resume_with_other_world_size_keeps_global_sequence():
    blocks = _blocks(29)
    reference = _global_stream([TrainLoader(blocks, 3, r, 2, seed=5) for r in range(2)], 20)  # 120 samples
    before = [TrainLoader(blocks, 3, r, 2, seed=5) for r in range(2)]
    got = _global_stream(before, 4)  # 24 samples
    state = before[0].state_dict()
    for world, mb in ((3, 2), (1, 4)):
        after = [TrainLoader(blocks, mb, r, world, seed=5) for r in range(world)]
        for loader in after:
            loader.load_state_dict(state)
        tail = _global_stream(after, 96 // (world * mb))
        assert got + tail == reference
    with pytest.raises(ValueError, match="training blocks"):
        TrainLoader(_blocks(30), 3, 0, 2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TrainLoader(blocks, 3, 0, 2, seed=6).load_state_dict(state)


def test_eval_loader_sharded_fixed_finite():
    blocks = _blocks(11)
    shards = [EvalLoader(blocks, 2, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    seen = [[i for b in s for i in _ids(b)] for s in shards]
    assert set().union(*map(set, seen)) == set(range(11))
    assert seen == [[i for b in s for i in _ids(b)] for s in shards]  # re-iterable, same order
    assert len(EvalLoader(blocks, 2, 0, 3, max_batches=1)) == 1


# ---------------------------------------------------------------- end to end


def test_build_data_end_to_end(corpus_dir, tmp_path):
    calls = []
    data = {}
    for rank in (0, 1):
        data[rank] = build_data(str(corpus_dir), None, seq_len=32, cache_dir=tmp_path / "c", rank=rank, world_size=2,
                                micro_batch_size=2, seed=0, vocab_size=300, barrier=lambda: calls.append(1))
    assert len(calls) == 2
    (train0, val0, tok0), (train1, val1, tok1) = data[0], data[1]
    assert tok0.get_vocab() == tok1.get_vocab() and len(tok0) <= 300
    b0, b1 = next(train0), next(train1)
    assert b0["input_ids"].shape == (2, 32) and not b0["input_ids"].equal(b1["input_ids"])
    assert int(b0["input_ids"].max()) < len(tok0) and len(val0) == len(val1) >= 1
    assert sorted((tmp_path / "c").iterdir()) == [tmp_path / "c" / n for n in ("hf_datasets", "packed", "tokenizers")]


def test_build_data_default_corpus_small(tmp_path):
    train, val, tok = build_data("default", seq_len=64, cache_dir=tmp_path / "c", micro_batch_size=4,
                                 max_mb=0.3, vocab_size=300)
    batch = next(train)
    assert batch["input_ids"].shape == (4, 64) and len(val) >= 1
    text = tok.decode(batch["input_ids"][0].tolist())
    assert len(text) > 64  # real text came back out
