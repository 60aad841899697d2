"""A port of the PTBTokenizer the COCO caption evaluation runs: its tokenization, in pure Python (no Java).

pycocoevalcap writes the captions one per line, runs Stanford CoreNLP 3.4.1's PTBTokenizer
(`-preserveLines -lowerCase`) on the file and drops punctuation tokens. This module ports the rules of that
tokenizer (PTBLexer.flex at tag v3.4.1, default options), so convert, training and scoring agree with the
official numbers without Java:
  "A man's dog, running." -> ["a", "man", "'s", "dog", "running"]
  "A (red) bus"           -> ["a", "-lrb-", "red", "-rrb-", "bus"]   (lowercasing hides -LRB- from the filter)

`tokenize` treats a caption as if an ordinary line followed it. `tokenize_batch` reproduces pycocoevalcap on a
whole list, where Java's lookahead crosses into the next line ("the letter B." before "The ...", "No." before
"5 ...") and the last caption meets end-of-file; `tokenize_references` does so for {image id: [captions]}, the form
the metrics, the SCST reward and its benchmark take references in.

Speed: plain ASCII words and numbers (most of COCO) skip the lexer; other space-separated chunks are lexed once and
cached; lines where a token or a lookahead can span a space ("1 1/2", "<a b>", "A. The") are lexed whole.

Known differences: line separators inside a caption become spaces (pycocoevalcap would break the line there and
misalign every later caption); letters/digits follow Python's Unicode tables, not Java 7's; Java's choice of
final sigma when lowercasing Greek capitals is approximated.
"""

import functools
import re

# Tokens pycocoevalcap removes after PTB tokenization (pycocoevalcap/tokenizer/ptbtokenizer.py). It filters the
# lowercased output, so the bracket names never match and "-lrb-" etc. survive; we reproduce that.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\u2028\u2029\x0b\x0c"})
_NON_BMP = re.compile("[^\u0000-\uffff]")
_SPACE_CLASS = "[ \t\u00a0\u2000-\u200a\u3000]"
_CHUNK = re.compile("[^ \t]+")  # URL and e-mail tokens may contain the other spaces (U+00A0, U+3000...)
_PLAIN_WORDS = re.compile(r"[ \t]*(?:[A-Za-z0-9]+(?:[ \t]+|$))*")
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_LATEX_QUOTES = str.maketrans({char: quote for chars, quote in [
    ("\u0091\u2018\u201b\u2039", "`"), ("\u0092\u2019\u203a", "'"), ("\u0093\u201c\u00ab", "``"),
    ("\u0094\u201d\u00bb", "''")] for char in chars})
_FRACTIONS = str.maketrans({"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"})
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
# Rules whose match or lookahead can cross a space: SGML, PHONE/FRAC, spaced ellipsis, "A." + capital, "No. 5".
_CROSSES_SPACE = re.compile(r"<|\d[ \u00a0]\d|\)[ \u00a0]\d|\." + _SPACE_CLASS + r"+(?:[A-Z<.\d]|(?i:ltd|lim))")
# Next lines that reveal whether a line's last chunk depends on them: an acronym before "The" or a tag, "No."
# before a digit.
_NEXT_LINE_PROBES = ("\nThe x\n", "\n<b>\n", "\n1\n")


def tokenize(caption: str) -> list[str]:
    """Lowercased PTB tokens with pycocoevalcap's punctuation removed."""
    return _tokenize_line(_prepare(caption), None, 0)


def tokenize_batch(captions: list[str]) -> list[list[str]]:
    """Exactly what pycocoevalcap's PTBTokenizer yields for these captions in this order."""
    lines = [_prepare(c) for c in captions]
    document = "\n".join(lines)
    tokenized, start = [], 0
    for line in lines:
        tokenized.append(_tokenize_line(line, document, start))
        start += len(line) + 1
    return tokenized


def tokenize_references(references: dict[int, list[str]]) -> dict[int, list[list[str]]]:
    """{image id: [tokens of each caption]}: every caption of every image in one tokenize_batch call, in the order
    given, as pycocoevalcap's tokenizer sees a split's references (its lookahead crosses from one caption, and one
    image, into the next)."""
    tokens = iter(tokenize_batch([caption for captions in references.values() for caption in captions]))
    return {image_id: [next(tokens) for _ in captions] for image_id, captions in references.items()}


def normalize(caption: str) -> str:
    """The caption as the scorer sees it: tokens joined by single spaces."""
    return " ".join(tokenize(caption))


def _prepare(caption: str) -> str:
    text = caption.translate(_LINE_BREAKS)
    if not text.isascii():  # Java reads UTF-16: outside the BMP it sees two (untokenizable) surrogates
        text = _NON_BMP.sub(_surrogate_pair, text)
    return text


def _surrogate_pair(match) -> str:
    code = ord(match.group()) - 0x10000
    return chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF))


def _tokenize_line(line: str, document, start: int) -> list[str]:
    """`document` is every line joined by newlines (None: an ordinary line follows); `line` begins at `start`."""
    if document is None:
        document, start = line + "\n", 0
    end = start + len(line)
    if _CROSSES_SPACE.search(line):
        return list(_finish(_lex(document, start, end)))
    head = _PLAIN_WORDS.match(line).end()  # most captions are ASCII words and numbers, maybe then "word."
    tokens = line[:head].lower().split()
    if not _ASSIMILATIONS.isdisjoint(tokens):
        head, tokens = 0, []
    chunks = list(_CHUNK.finditer(line, head))
    for i, chunk in enumerate(chunks):
        word = chunk.group()
        if word.isascii() and word.isalnum() and word.lower() not in _ASSIMILATIONS:
            tokens.append(word.lower())
        elif i == len(chunks) - 1 and (end == len(document) or _next_line_matters(word)):
            tokens.extend(_finish(_lex(document, start + chunk.start(), end)))
        else:
            tokens.extend(_lex_chunk(word))
    return tokens


@functools.lru_cache(maxsize=1 << 16)
def _lex_chunk(chunk: str) -> tuple[str, ...]:
    return _finish(_lex(chunk + " "))


@functools.lru_cache(maxsize=1 << 12)
def _next_line_matters(last_chunk: str) -> bool:
    alone = _lex_chunk(last_chunk)
    return any(_finish(_lex(last_chunk + probe, 0, len(last_chunk))) != alone for probe in _NEXT_LINE_PROBES)


def _finish(raw_tokens) -> tuple[str, ...]:
    # Java lowercases with Locale.ENGLISH, then pycocoevalcap filters.
    tokens = (_java_lower(_join_surrogates(t)) for t in raw_tokens)
    return tuple(t for t in tokens if t not in PUNCTUATIONS)


def _java_lower(token: str) -> str:
    if "\u03a3" not in token:
        return token.lower()
    return "".join(_java_lower_sigma(token, i) if c == "\u03a3" else c.lower() for i, c in enumerate(token))


def _java_lower_sigma(token: str, i: int) -> str:
    """Java picks final sigma by word boundaries (java.text.BreakIterator), which Python's Final_Sigma rule
    does not follow: "ΟΔΟΣ-It" keeps σ, "ΟΔΟΣ東京" gets ς. This approximates its words."""
    def cased_in_word(chars, joiners):
        for c in chars:
            if c.lower() != c.upper():
                return True
            if not ((c.isalnum() and c < "\u2e80") or c in joiners):
                return False
        return False
    final = cased_in_word(reversed(token[:i]), "") and not cased_in_word(token[i + 1:], "-'.")
    return "\u03c2" if final else "\u03c3"


def _join_surrogates(token: str) -> str:
    if token.isascii():
        return token
    return token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _lex(text: str, start: int = 0, stop: int | None = None) -> list[str]:
    """Tokens starting in text[start:stop], with JFlex semantics: at each position the longest match wins
    (trailing context counts), ties go to the earlier rule. An action returns (token or None, characters
    consumed); consuming less than the match is JFlex's pushback."""
    rules = _rules()
    tokens, pos, stop = [], start, len(text) if stop is None else stop
    while pos < stop:
        best_len, best = 0, None
        for pattern, action in rules:
            m = pattern.match(text, pos)
            if m is None:
                continue
            length = max(m.end(), m.end("la") if "la" in pattern.groupindex else 0) - pos
            if length > best_len:
                best_len, best = length, (m.group(), action)
        token, consumed = best[1](best[0])
        if token is not None:
            tokens.append(token)
        pos += consumed
    return tokens


# ---- actions ---------------------------------------------------------------------------------------------

def _keep(tok):
    return tok, len(tok)


def _skip(tok):
    return None, len(tok)


def _emit(transform):
    return lambda tok: (transform(tok), len(tok))


def _pushback(n, keep_text=False):
    """Consume all but n characters; emit the consumed part (or the whole match when keep_text)."""
    return lambda tok: (tok if keep_text else tok[:-n], len(tok) - n)


def _acronym_before_sentence(tok):
    if len(tok) == 2:  # "I." before "The": the letter, then the period
        return tok[:1], 1
    return tok, len(tok) - 1  # "U.S." and then "." again


def _no_soft_hyphens(tok):
    return tok.replace("\u00ad", "") or "-"


def _latex_quotes(probably_left):
    single, double = ("`", "``") if probably_left else ("'", "''")

    def convert(tok):
        tok = re.sub("&apos;|'", single, tok)  # case-sensitive in Java, unlike the lexer's match
        return re.sub('"|&quot;', double, tok).translate(_LATEX_QUOTES)
    return _emit(convert)


def _ptb_parens(tok):
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


def _currency(tok):
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", tok.replace("\u00a2", "cents").replace("\u00a3", "#"))


def _amp(tok):
    return re.sub("(?i:&amp;)", "&", tok)


def _nbsp(tok):
    return tok.replace(" ", "\u00a0")


# ---- the lexer's macros and rules, in PTBLexer.flex order ---------------------------------------------------

def _char_ranges(predicate) -> str:
    """A regex class body for the BMP characters satisfying `predicate` (JFlex's %unicode is BMP-only)."""
    parts, start = [], None
    for code in range(0x10001):
        inside = code < 0x10000 and predicate(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            parts.append(f"\\u{start:04x}-\\u{code - 1:04x}")
            start = None
    return "".join(parts)


def _ci(words: str) -> str:
    """JFlex %caseless alternation: literal text is caseless, a leading [X] class stays case-sensitive."""
    out = []
    for word in words.split("|"):
        if word.startswith("[") and word[2] == "]":
            out.append(word[1] + (f"(?i:{word[3:]})" if word[3:] else ""))
        else:
            out.append(f"(?i:{word})")
    return "(?:" + "|".join(out) + ")"


_EXTRA_LETTERS = (
    "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385\u03cf\u03f6"
    "\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4"
    "\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f"
    "\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963"
    "\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f"
    "\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44"
    "\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd")
_MISC_SYMBOLS = (
    "+%&~\\^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0\u05c3\u05c6"
    "\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8\u0964"
    "\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e"
    "\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65")
_SENTENCE_START_WORDS = (
    "[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er|[H]ere|[H]owever|"
    "[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\\.|[M]s\\.|[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o|"
    "[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et|"
    "[Y]ou")


@functools.cache
def _rules() -> list:
    letter_class = _char_ranges(str.isalpha)
    upper = f"[{_char_ranges(str.isupper)}]"
    alpha = f"[{letter_class}]"  # JFlex [:letter:]
    alnum = f"[{letter_class}\\d]"
    letter = f"(?:[{letter_class}{_EXTRA_LETTERS}]|&[aeiouAEIOU](?i:acute|grave|uml);)"
    space, spacenl = _SPACE_CLASS, r"(?:[ \t\u00a0\u2000-\u200a\u3000]|\r\n?|[\n\u2028\u2029\x0b\x0c\x85])"
    sgml = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*"
            r"(?:'[^']*'|\"[^\"]*\")|[A-Za-z][A-Za-z0-9_:.\-]*))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
    apos = r"(?:['\u0092\u2019]|(?i:&apos;))"
    apos_etc = rf"(?:{apos}|[`\u0091\u2018\u201b])"
    word = rf"{letter}(?:{letter}|\d)*(?:[.!?]{letter}(?:{letter}|\d)*)*"
    redaux = rf"{apos}(?:[msdMSD]|(?i:re|ve|ll))"
    sredaux = rf"(?i:n){apos_etc}(?i:t)"
    acro_words = r"(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))"
    acro = rf"(?:{acro_words}|[A-Za-z](?:\.[A-Za-z])*)"
    abbrev1 = ("(?:" + _ci("Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri") + "|"
               + _ci("Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|"
                     "Mich|Minn|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo") + "|"
               + _ci("Inc|Cos?|Corp|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq|Jr|Sr|Bros|"
                     r"Ed\.D|Ph\.D|Blvd|Rd|Esq|etc|al|seq|Bldg")
               + r"|(?i:pp?t)[ye](?i:s)?)\.")
    # acro first: Python takes the first alternative that fits, JFlex the longest ("a.k.a.b." is one acronym)
    abbrev4 = (f"(?:{acro}|"
               + _ci("Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|"
                     "Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|"
                     r"Insp|Mlle|Mme|Msgr|Sfc|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl|Dept")
               + r"|(?i:m)[ft](?i:g))")
    phone = (r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])"
             r"[0-9]{3,4}[\- \u00a0]?[0-9]{3,5}")
    phone_dots = r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
    # Alternatives ordered so that Python's first fit is JFlex's longest match ("x-u.s.", "i.e.-non-U.S.a.m.").
    hthing = (r"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*"
              rf"(?:-(?:[A-Za-z](?:\.[A-Za-z])+\.|[A-Za-z0-9\u00ad]+|{acro_words}\.))+")
    thing_part = rf"(?:[dDoOlL]{apos_etc}{alnum})?{alnum}+"
    thing = rf"{thing_part}(?:[\-_\u058a\u2010\u2011]{thing_part})*"
    thinga = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
    insentp = r"[,;:\u3001]"
    filename_ext = ("bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|"
                    "pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip")
    no_url = r" \t\n\f\r\"<>|"
    apoword = [
        rf"{apos}(?i:n){apos}?", rf"[lLdDjJ]{apos}", rf"(?i:dunkin|somethin|ol){apos}", rf"{apos}(?i:em)",
        rf"[A-HJ-XZn]{apos_etc}{alpha}{{2}}{alpha}*", rf"{apos}[2-9]0(?i:s)", rf"{apos}(?i:till?|cause)",
        rf"{alpha}+[aeiouyAEIOUY]{apos_etc}[aeiouA-Z]{alpha}*",
        r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", rf"(?i:o){apos_etc}(?i:o)"]
    quote_chars = "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]"
    la = lambda pattern: f"(?=(?P<la>{pattern}))"  # noqa: E731  (JFlex trailing context r1/r2)

    table = [
        (r"(?i:c)\+\+|(?i:[cf])#", _keep),
        (r"(?i:cannot|'twas)", _pushback(3)),  # (two rules in JFlex, merged here as they never both match)
        (r"(?i:'tis|gonna|gotta|lemme|gimme|wanna)", _pushback(2)),
        (sgml, _emit(_nbsp)),
        ("(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", _emit(lambda tok: "--")),
        (r"(?i:&amp;)", _emit(_amp)),
        (r"(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)", _keep),
        (word + la(redaux), _emit(_no_soft_hyphens)),
        (r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*" + la(sredaux), _emit(_no_soft_hyphens)),
        (word, _emit(_no_soft_hyphens)),
        *[(alternative, _keep) for alternative in apoword],
        (rf"(?i:y){apos}" + la(alpha), _keep),
        (rf"(?i:https?)://[^{no_url}(){{}}]+[^{no_url}.!?(){{}},\-]", _keep),
        (rf"(?i:www)\.(?:[^{no_url}.!?(){{}},]+\.)+[a-zA-Z]{{2,4}}(?:/[^{no_url}()]+[^{no_url}.!?(){{}},\-])?",
         _keep),
        (rf"(?:[^{no_url}`'.!?(){{}},-_$]+\.)+(?i:com|net|org|edu)(?:/[^{no_url}()]+[^{no_url}.!?(){{}},\-])?",
         _keep),
        (r"(?:(?i:&lt;)|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*"
         r"[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:(?i:&gt;)|>)?", _keep),
        (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{letter}+", _keep),
        (redaux + la("[^A-Za-z]"), _latex_quotes(False)),
        (sredaux + la("[^A-Za-z]"), _latex_quotes(False)),
        (r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}", _keep),
        (r"[\-+]?(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)", _emit(_no_soft_hyphens)),
        ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", _keep),
        (r"(?:\d{1,4}[\- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", _emit(_nbsp)),
        ("[\u00bc\u00bd\u00be\u2153-\u215e]", _emit(lambda tok: tok.translate(_FRACTIONS))),
        (rf"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls|cap{apos}n|"
         rf"c{apos}est)", _emit(_amp)),
        (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", _keep),
        (r"[A-Z]*\$|#", _keep),
        ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", _emit(_currency)),
        (rf"{acro}\." + la(f"{spacenl}+(?:{_ci(_SENTENCE_START_WORDS)}|{sgml}){spacenl}"), _acronym_before_sentence),
        (r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\." + la(rf"{spacenl}?\d"), _keep),
        (r"(?:(?i:pt)[eyEY]|(?i:co))\." + la(rf"{space}(?i:ltd|lim)"), _keep),
        (abbrev1 + la(rf"{spacenl}(?:{spacenl}|{upper}|{sgml})"), _pushback(1, keep_text=True)),
        (abbrev1 + la(r"(?s:..)"), _keep),
        (abbrev1, _pushback(1, keep_text=True)),
        (rf"(?:{abbrev4})\.", _keep),
        (abbrev4 + la(space), _keep),
        (acro + la(spacenl), _keep),
        (rf"{apos}[0-9][0-9]" + la(spacenl), _keep),
        (rf"(?:{letter}|\d)+(?:\.(?:{letter}|\d)+)*\.(?i:{filename_ext})" + la(rf"{spacenl}|[.?!,]"), _keep),
        (rf"{word}\." + la(insentp), _emit(_no_soft_hyphens)),
        (phone, _emit(lambda tok: _ptb_parens(_nbsp(tok)))),
        (phone_dots, _keep),
        (r"(?:\"|(?i:&quot;))" + la("[A-Za-z0-9$]"), _latex_quotes(True)),
        (r"\"|(?i:&quot;)", _latex_quotes(False)),
        ("\x7f", _skip),
        (r"<|(?i:&lt;)", _emit(lambda tok: "<")),
        (r">|(?i:&gt;)", _emit(lambda tok: ">")),
        (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]" + la("[^A-Za-z0-9]"), _emit(_ptb_parens)),
        (r"[\^x=~<>]\.\[\^(?i:x)=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
         r"|\([\^x=~<>']-[\^x=~<>'`]\)", _emit(_ptb_parens)),
        (r"[{}\[\]()]", _emit(_BRACKETS.get)),
        (r"-+", _emit(lambda tok: "--" if 3 <= len(tok) <= 4 else tok)),
        ("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", _emit(lambda tok: "...")),
        # FNMARKS, ASTS, INSENTP, [?!]+, sentence ends, "=", "/": one rule each, no two share a first character
        (r"@+|#+|_+|\*+|(?:\\\*){1,3}|[,;:\u3001]|[?!]+|=|/|"
         "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", _keep),
        (rf"{hthing}\." + la(insentp), _emit(_no_soft_hyphens)),
        (hthing, _emit(_no_soft_hyphens)),
        (rf"{thing}\." + la(insentp), _keep),
        (thing, _keep),
        (rf"{thinga}\." + la(insentp), _emit(_amp)),
        (thinga, _emit(_amp)),
        ("'" + la("[A-Za-z][^ \t\n\r\u00a0]"), _latex_quotes(True)),
        (redaux, _latex_quotes(False)),
        (sredaux, _latex_quotes(False)),
        (f"''|{quote_chars}{{1,2}}|{apos}", _latex_quotes(False)),
        (r"<<|>>", _keep),
        (f"[{_MISC_SYMBOLS}]", _keep),
        ("\0|" + space + "+|[\u200b\u200e\u200f\ufeff]", _skip),
        (spacenl, _skip),
        (r"(?i:&nbsp;)", _skip),
        (r"(?s:.)", _skip),  # untokenizable: Java drops it (and logs a warning)
    ]
    return [(re.compile(pattern), action) for pattern, action in table]
