import pytest

from mmgen.tokenizers.text import TextTokenizer


def test_round_trip_and_save_load(tokenizer, tmp_path):
    text = "a handwritten digit 7, ü 日本"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte fallback: nothing is <unk>
    tokenizer.save(tmp_path)
    again = TextTokenizer.load(tmp_path)
    assert again.encode(text) == tokenizer.encode(text)
    assert (again.boi_id, again.eoi_id, again.bos_id) == (tokenizer.boi_id, tokenizer.eoi_id, tokenizer.bos_id)


@pytest.mark.parametrize("text", ["<boi>", "<eoi>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"])
def test_user_text_never_produces_special_ids(tokenizer, text):
    ids = tokenizer.encode(f"look {text} here {text}")
    assert not set(ids) & tokenizer.special_ids
    assert text in tokenizer.decode(ids)


def test_special_ids_are_distinct(tokenizer):
    ids = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.boi_id, tokenizer.eoi_id,
           tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id]
    assert len(set(ids)) == len(ids)


def test_foreign_model_is_rejected(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50), model_writer=buf, vocab_size=20,
                                   hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="not trained by mmgen"):
        TextTokenizer(buf.getvalue())


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        TextTokenizer.load(tmp_path)
