"""capfast.store.ptb_tokenizer.tokenize against pycocoevalcap's Java PTBTokenizer (CoreNLP 3.4.1 + punctuation filter).

CASES holds the Java output frozen (each caption followed by an ordinary line, as inside a batch), so the parity
check runs without Java; with `java` on PATH the same captions also go through pycocoevalcap live.
"""

import shutil

import pytest

from capfast.store.ptb_tokenizer import normalize, tokenize, tokenize_batch, tokenize_references

CASES = [
    ('A man riding a wave on top of a surfboard.', 'a man riding a wave on top of a surfboard'),
    ('A Man Riding A Wave On Top Of A Surfboard', 'a man riding a wave on top of a surfboard'),
    ('TWO DOGS PLAYING IN THE SNOW.', 'two dogs playing in the snow'),
    ("a man's bike leaning against a wall", "a man 's bike leaning against a wall"),
    ("A woman's hand holding a cell phone.", "a woman 's hand holding a cell phone"),
    ("The dogs' owner is throwing a frisbee.", 'the dogs owner is throwing a frisbee'),
    ("A dog 's bone on the grass.", "a dog 's bone on the grass"),
    ("It's a sunny day at the beach.", "it 's a sunny day at the beach"),
    ("A cat that can't get off the couch.", "a cat that ca n't get off the couch"),
    ("A dog that won't let go of a stick", "a dog that wo n't let go of a stick"),
    ("They're standing next to a large elephant.", "they 're standing next to a large elephant"),
    ("We'll see a train coming, I'm sure.", "we 'll see a train coming i 'm sure"),
    ("Somebody ain't happy about the rain.", "somebody ai n't happy about the rain"),
    ('A man cannot get his kite to fly.', 'a man can not get his kite to fly'),
    ('Kids gonna play some baseball, wanna join?', 'kids gon na play some baseball wan na join'),
    ('A sign that says "Stop" on a pole.', 'a sign that says stop on a pole'),
    ("A man saying 'cheese' for the camera.", 'a man saying cheese for the camera'),
    ("A 'Slow' sign next to a road.", 'a slow sign next to a road'),
    ('A bus (number 5) parked near the curb.', 'a bus -lrb- number 5 -rrb- parked near the curb'),
    ('A skateboarder [in mid air] above a ramp.', 'a skateboarder -lsb- in mid air -rsb- above a ramp'),
    ('A table with {various} items on it.', 'a table with -lcb- various -rcb- items on it'),
    ('A hot-dog with ketchup and mustard.', 'a hot-dog with ketchup and mustard'),
    ('A man in a t-shirt and a well-dressed woman.', 'a man in a t-shirt and a well-dressed woman'),
    ("An ice-cream cone dripping on a kid's hand.", "an ice-cream cone dripping on a kid 's hand"),
    ('A 3.5 inch screen on a cell phone.', 'a 3.5 inch screen on a cell phone'),
    ('A sign showing 1,000 miles to go.', 'a sign showing 1,000 miles to go'),
    ('A clock that reads 10:30 on a tower.', 'a clock that reads 10:30 on a tower'),
    ('Salt & pepper shakers on a table.', 'salt & pepper shakers on a table'),
    ('An AT&T store and a B&W photo on the corner.', 'an at&t store and a b&w photo on the corner'),
    ('A black/white cat on a bed.', 'a black/white cat on a bed'),
    ('A man  with   many spaces\tbetween words.', 'a man with many spaces between words'),
    ('A giraffe standing in a field.\n', 'a giraffe standing in a field'),
    ('  A zebra grazing on grass. ', 'a zebra grazing on grass'),
    ('A café with outdoor seating.', 'a café with outdoor seating'),
    ('A naïve painting of a jalapeño pepper.', 'a naïve painting of a jalapeño pepper'),
    ('A woman in a kimono in 東京.', 'a woman in a kimono in 東京'),
    ('A smiling 😀 emoji on a phone screen.', 'a smiling emoji on a phone screen'),
    ('A kite flying high... in the blue sky', 'a kite flying high in the blue sky'),
    ('A man -- wearing a hat -- walks by.', 'a man wearing a hat walks by'),
    ('A woman—with an umbrella—walks in the rain.', 'a woman with an umbrella walks in the rain'),
    ('A pizza with pepperoni; it looks delicious!', 'a pizza with pepperoni it looks delicious'),
    ('Is this a cat or a dog?', 'is this a cat or a dog'),
    ('A baseball player swinging at a pitch: strike!', 'a baseball player swinging at a pitch strike'),
    ('A “Welcome” sign over a doorway.', 'a welcome sign over a doorway'),
    ('A dog’s bed next to the fireplace.', "a dog 's bed next to the fireplace"),
    ('Mr. Smith standing next to his car.', 'mr. smith standing next to his car'),
    ("A man at St. Mark's square with pigeons.", "a man at st. mark 's square with pigeons"),
    ('A tennis player at the U.S. Open.', 'a tennis player at the u.s. open'),
    ('A train station at 5 p.m. with people.', 'a train station at 5 p.m. with people'),
    ('A boat, a car, a plane, etc.', 'a boat a car a plane etc.'),
    ('A sign that reads No. 5 on a door.', 'a sign that reads no. 5 on a door'),
    ('A recipe calling for 1 1/2 cups of flour.', 'a recipe calling for 1\xa01/2 cups of flour'),
    ('A sign reading ½ price on a window.', 'a sign reading 1/2 price on a window'),
    ('An elephant that is 3-4 years old.', 'an elephant that is 3-4 years old'),
    ('The 1990s style kitchen with a 2nd floor window.', 'the 1990s style kitchen with a 2nd floor window'),
    ('A man holding a $5 bill near a 50% off sign.', 'a man holding a $ 5 bill near a 50 % off sign'),
    ("A rock 'n' roll band playing at 7 o'clock.", "a rock 'n' roll band playing at 7 o'clock"),
    ('A phone number (555) 123-4567 on a truck.', 'a phone number -lrb-555-rrb-\xa0123-4567 on a truck'),
    ('A website www.example.com on a bus.', 'a website www.example.com on a bus'),
    ('The cat is on the mat.The dog is not.', 'the cat is on the mat.the dog is not'),
    ('A plate with eggs,bacon and toast.', 'a plate with eggs bacon and toast'),
    ("Dog's toy!!! So cute :)", "dog 's toy !!! so cute :-rrb-"),
    ('A player wearing a #23 jersey.', 'a player wearing a # 23 jersey'),
    ('Vitamin C. The orange juice is fresh.', 'vitamin c the orange juice is fresh'),
    ('A sign with the letter B.', 'a sign with the letter b.'),
]
CAPTIONS = [caption for caption, _ in CASES]
NEUTRAL_LINE = "a dog"

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java for pycocoevalcap's PTBTokenizer")


@pytest.mark.parametrize("caption, expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_tokenize_matches_frozen_java_output(caption, expected):
    assert " ".join(tokenize(caption)) == expected
    assert normalize(caption) == expected


def test_batch_lookahead_crosses_into_the_next_line():
    # Java reads "B." before a line starting "The " as the letter plus a sentence-final period.
    assert tokenize_batch(["A sign with the letter B.", "The sign is red."]) == [
        ["a", "sign", "with", "the", "letter", "b"], ["the", "sign", "is", "red"]]
    assert tokenize_batch(["A sign with the letter B.", "a red sign"])[0][-1] == "b."
    assert tokenize_batch(["No.", "5 dogs"])[0] == ["no."]
    assert tokenize_batch(["No.", "five dogs"])[0] == ["no"]


def test_references_are_one_batch_across_images_in_the_order_given():
    """tokenize_references: the lookahead crosses from one image's last reference into the next image's first."""
    references = {7: ["A sign with the letter B."], 3: ["The sign is red.", "No."], 5: ["5 dogs", "two cats"]}
    tokenized = tokenize_references(references)
    assert list(tokenized) == [7, 3, 5]
    assert tokenized == {7: [["a", "sign", "with", "the", "letter", "b"]],
                         3: [["the", "sign", "is", "red"], ["no."]],
                         5: [["5", "dogs"], ["two", "cats"]]}


def test_batch_of_ordinary_lines_equals_one_by_one():
    lines = [c for c in CAPTIONS if not c.rstrip().endswith("B.")]
    assert tokenize_batch(lines + [NEUTRAL_LINE])[:-1] == [tokenize(c) for c in lines]


def test_line_breaks_inside_a_caption_are_spaces():
    assert tokenize("A dog\r\non a\u2028couch.\n") == ["a", "dog", "on", "a", "couch"]


def test_the_benchmark_s_captions_tokenize_as_ptb_does():
    """Its speed is `capfast bench tokenize`'s line (tests/test_bench.py runs it)."""
    from capfast.bench.tokenize import sample_captions

    tokenized = [tokenize(c) for c in sample_captions(100)]
    assert tokenized[57] == "a man 's board number 7 rides wave 57 on top of a surfboard".split()


def _java_ptb(captions: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [tokenized[i][0] for i in range(len(captions))]


@needs_java
def test_live_java_each_caption_followed_by_an_ordinary_line():
    interleaved = [line for caption in CAPTIONS for line in (caption, NEUTRAL_LINE)]
    java = _java_ptb(interleaved)[0::2]
    ours = [" ".join(tokenize(c)) for c in CAPTIONS]
    assert [(c, j, o) for c, j, o in zip(CAPTIONS, java, ours) if j != o] == []


@needs_java
def test_live_java_batch_with_next_line_lookahead_and_end_of_file():
    captions = CAPTIONS + ["The sign is red.", "Vitamin C.", "A picture of the letter A."]
    java = _java_ptb(captions)
    ours = [" ".join(tokens) for tokens in tokenize_batch(captions)]
    assert [(c, j, o) for c, j, o in zip(captions, java, ours) if j != o] == []
