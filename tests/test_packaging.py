import importlib


def test_hugging_face_tokenizers_is_not_shadowed():
    tokenizers = importlib.import_module("tokenizers")
    assert hasattr(tokenizers, "Tokenizer"), "top-level `tokenizers` must be Hugging Face's"
    assert "mmgen" not in (tokenizers.__file__ or "")
    ours = importlib.import_module("mmgen.tokenizers.text")
    assert hasattr(ours, "TextTokenizer")


def test_transformers_still_imports_its_tokenizers():
    from transformers import PreTrainedTokenizerFast  # noqa: F401
