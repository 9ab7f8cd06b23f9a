import pytest

from pipeline.tokenizer import EOS, PAD, Tokenizer, TokenizerError


def test_specials_follow_marian_conventions(tiny_tokenizer):
    hf = tiny_tokenizer.hf
    assert hf.convert_ids_to_tokens(0) == EOS
    assert tiny_tokenizer.pad_id == len(tiny_tokenizer) - 1 and hf.convert_ids_to_tokens(tiny_tokenizer.pad_id) == PAD
    # CTranslate2's vocabulary view drops the trailing <pad>.
    assert len(tiny_tokenizer.tokens) == len(tiny_tokenizer) - 1 and PAD not in tiny_tokenizer.tokens


def test_round_trip_and_eos(tiny_tokenizer):
    texts = ["In the beginning God created the heavens and the earth.", "Und Gott sprach: Es werde Licht!"]
    ids = tiny_tokenizer.encode_target(texts)
    assert all(seq[-1] == tiny_tokenizer.eos_id for seq in ids)
    assert tiny_tokenizer.decode(ids) == texts


def test_reload_has_same_vocab_hash(tiny_tokenizer):
    again = Tokenizer.load(tiny_tokenizer.path)
    assert again.vocab_hash == tiny_tokenizer.vocab_hash
    assert again.vocab_hash.startswith("sha256:")


def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "nope")


def test_directory_without_tokenizer_files_says_what_is_missing(tmp_path):
    """A CTranslate2 export without its tokenizer files (model.bin, config, vocabulary only): the error names the
    directory and the files looked for, not a package that is in fact installed."""
    bare = tmp_path / "ct2-without-tokenizer"
    bare.mkdir()
    (bare / "model.bin").write_bytes(b"\0" * 64)
    (bare / "config.json").write_text('{"add_source_bos": false, "add_source_eos": false, "unk_token": "<unk>"}')
    (bare / "shared_vocabulary.json").write_text('["</s>", "<unk>", "a"]')
    for directory in (bare, tmp_path / "empty"):
        directory.mkdir(exist_ok=True)
        with pytest.raises(TokenizerError) as info:
            Tokenizer.load(directory)
        message = str(info.value)
        assert f"no tokenizer files in {directory}" in message
        assert all(name in message for name in ("tokenizer.json", "source.spm", "target.spm", "vocab.json"))
        assert "sentencepiece or tiktoken" not in message
    (bare / "source.spm").write_bytes(b"")  # half a Marian tokenizer
    with pytest.raises(TokenizerError, match="target.spm, vocab.json missing"):
        Tokenizer.load(bare)


def test_training_is_deterministic(tiny_data, tmp_path):
    """Same text → same ids. The raw trainer orders pieces differently from run to run, and a retrained
    tokenizer would silently send the teacher down another path."""
    import pyarrow.parquet as pq

    from pipeline.tokenizer import train_tokenizer

    train = pq.read_table(tiny_data / "train.parquet")
    texts = train.column("source").to_pylist() + train.column("target").to_pylist()
    a = train_tokenizer(texts, tmp_path / "a", vocab_size=600)
    b = train_tokenizer(texts, tmp_path / "b", vocab_size=600)
    assert a.hf.convert_ids_to_tokens(list(range(len(a)))) == b.hf.convert_ids_to_tokens(list(range(len(b))))
    assert a.vocab_hash == b.vocab_hash
    assert a.hf.convert_ids_to_tokens([0, 1, len(a) - 1]) == ["</s>", "<unk>", "<pad>"]
