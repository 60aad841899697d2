import pytest

from capfast.store.ptb_tokenizer import normalize, tokenize


@pytest.mark.parametrize("caption, expected", [
    ("A man's dog, running.", "a man 's dog running"),
    ("A RED Double-Decker Bus", "a red double-decker bus"),
    ("Two dogs, a cat. And birds.", "two dogs a cat and birds"),
    ("I don't know", "i do n't know"),
    ("they're here, we'll go", "they 're here we 'll go"),
    ("a well-known hot-dog stand", "a well-known hot-dog stand"),
    ("a  man   walking\tdown", "a man walking down"),
    ("A dog on a couch.\n", "a dog on a couch"),
    ("  leading and trailing spaces  ", "leading and trailing spaces"),
    ("What is this? A cat!", "what is this a cat"),
    ("a man...", "a man"),
    ("cats; dogs: birds", "cats dogs birds"),
    ("it is 3.5 feet tall", "it is 3.5 feet tall"),
    ("", ""),
])
def test_normalize(caption, expected):
    assert normalize(caption) == expected


def test_tokenize_returns_list_of_tokens():
    assert tokenize("A man's dog, running.") == ["a", "man", "'s", "dog", "running"]


def test_line_breaks_inside_a_caption_are_spaces():
    assert tokenize("a dog\r\non a\rcouch") == ["a", "dog", "on", "a", "couch"]


def test_tokenizing_tokenized_text_changes_nothing():
    caption = "A Woman's bike, parked near a well-lit store."
    tokens = ["a", "woman", "'s", "bike", "parked", "near", "a", "well-lit", "store"]
    assert tokenize(caption) == tokens
    assert tokenize(normalize(caption)) == tokens and tokenize(" ".join(tokens)) == tokens
