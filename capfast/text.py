"""Caption tokenization matching the COCO caption evaluation's PTBTokenizer on ordinary captions.

pycocoevalcap runs Stanford's PTBTokenizer (`-preserveLines -lowerCase`) and then drops punctuation
tokens. We reproduce that in pure Python so that convert, training and scoring need no Java:
  "A man's dog, running." -> ["a", "man", "'s", "dog", "running"]
"""

import re

# Tokens pycocoevalcap removes after PTB tokenization (pycocoevalcap/tokenizer/ptbtokenizer.py).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_CLITICS = re.compile(r"(?i)(\w)('s|'m|'d|'ll|'re|'ve|n't)\b")
_SPLIT_PUNCT = re.compile(r"(\.\.\.|--|[,;:!?\"()\[\]{}]|``|'')")
_TRAILING_PERIOD = re.compile(r"(\S)\.(?=\s|$)")
_QUOTES = re.compile(r"(^|\s)'|'(\s|$)")


def tokenize(caption: str) -> list[str]:
    """Lowercased PTB-style tokens with punctuation removed."""
    text = caption.replace("\n", " ").replace("\r", " ").lower()
    text = _SPLIT_PUNCT.sub(r" \1 ", text)
    text = _TRAILING_PERIOD.sub(r"\1 .", text)
    text = _QUOTES.sub(r"\1 ' \2", text)
    text = _CLITICS.sub(r"\1 \2", text)
    tokens = []
    for token in text.split():
        if token in PUNCTUATIONS or token in "()[]{}\"":
            continue
        tokens.append(token)
    return tokens


def normalize(caption: str) -> str:
    """The caption as the scorer sees it: tokens joined by single spaces."""
    return " ".join(tokenize(caption))
