"""capfast.eval.metrics against pycocoevalcap's own pipeline (COCO + loadRes + COCOEvalCap, Java PTBTokenizer).

EXPECTED was computed by that pipeline on the data below, so the default (pure Python) path is checked without
Java; with `java` on PATH the official pipeline also runs live (SPICE stubbed out: it downloads CoreNLP).
"""

import json
import logging
import shutil

import pytest

from capfast.errors import CapfastError
from capfast.eval import metrics
from capfast.eval.metrics import score, write_reference_annotations, write_results

REFERENCES = {
    139: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
          "Someone is surfing on a big wave.", "A man's surfboard cutting through a wave."],
    285: ["A big brown bear sitting in the grass.", "A large bear sits on a grassy field.",
          "The bear is resting in the tall grass"],
    632: ["A bedroom with a bed and a bookshelf.", "A neatly made bed in a small bedroom.",
          "A room with a bed, a lamp, and a window."],
    724: ["A stop sign on the corner of a street.", "A red STOP sign next to a road.",
          "The \"STOP\" sign is bent over."],
    776: ["Three teddy bears sitting next to each other.", "Teddy bears (brown and white) on a shelf.",
          "A group of stuffed animals."],
    785: ["A woman skiing down a snowy hill.", "A skier in a red jacket on the slope.",
          "The woman's skis are in the snow."],
    802: ["A kitchen with a stove, a sink and cabinets.", "A small kitchen; it has white cabinets.",
          "The kitchen's counter is clean."],
    872: ["A baseball player swinging a bat at a ball.", "A batter hits the ball during a game.",
          "The player can't wait to hit the ball!"],
    885: ["A tennis player hitting a ball with a racket.", "A man playing tennis on a court.",
          "A tennis player's racket hits a ball."],
    1000: ["A group of people standing around a table.", "People at a party, eating cake.",
           "Several kids & adults gathered together."],
    1268: ["A giraffe standing next to a tall tree.", "The giraffe's neck reaches the leaves.",
           "A giraffe eating from a tree in a zoo."],
    1296: ["A pizza with cheese and pepperoni on a plate.", "A 12-inch pizza on a wooden table.",
           "Pizza's ready: cheese, tomato and basil."],
    1353: ["A cat sleeping on top of a laptop.", "A grey cat lying on a computer keyboard.",
           "The cat is on the laptop, asleep."],
    1425: ["Two dogs playing with a frisbee in a park.", "Dogs running on the grass after a frisbee.",
           "A dog's frisbee game in the park."],
    1490: ["A red double-decker bus on a city street.", "A bus driving down the road in London.",
           "A double decker bus stopped at a bus stop."],
    1503: ["A plane flying in the blue sky.", "An airplane (a jet) in the sky.",
           "A jet airliner taking off from the runway."],
    1584: ["A sign with the letter B.", "The sign is blue and white."],
    1675: ["An elephant walking through the grass.", "A large elephant in the wild.",
           "The elephant's trunk is raised."],
    1761: ["A train pulling into a station.", "A passenger train at the platform.",
           "The train's doors are open; people wait."],
    1818: ["A boy holding an umbrella in the rain.", "A child with a yellow umbrella.",
           "It's raining, and a boy has an umbrella."],
}
RESULTS = {
    139: "a man riding a wave on top of a surfboard",
    285: "A Brown Bear Sitting In The Grass.",
    632: "a bedroom with a bed and a window",
    724: "a red stop sign on a street corner",
    776: "three teddy bears sitting on a shelf",
    785: "a woman's skis in the snow",
    802: "a kitchen with a stove and a sink",
    872: "a baseball player can't hit the ball",
    885: "A man playing tennis, on a court.",
    1000: "a group of people standing around a table",
    1268: "a giraffe eating leaves from a tree",
    1296: "a pizza with cheese on a plate",
    1353: "a cat laying on a laptop computer",
    1425: "a dog playing with a frisbee",
    1490: "a red bus driving down a street",
    1503: "a large jet flying through a blue sky",
    1584: "a blue sign with a letter",
    1675: "an elephant standing in the grass",
    1761: "a train (a passenger train) at a station",
    1818: "a person holding an umbrella",
}

# COCOEvalCap on the two files written from RESULTS/REFERENCES (Java PTBTokenizer, meteor-1.5.jar).
EXPECTED = {
    "BLEU-1": 0.9064804057298699,
    "BLEU-2": 0.7933540230381376,
    "BLEU-3": 0.6734742551629821,
    "BLEU-4": 0.5620107815789875,
    "METEOR": 0.3960142900218903,
    "ROUGE-L": 0.7389334956541752,
    "CIDEr": 2.3585897963079825,
}
OFFICIAL_NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                  "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
WITHOUT_METEOR = [key for key in EXPECTED if key != "METEOR"]

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java for pycocoevalcap")


def test_python_tokenizer_matches_frozen_official_numbers():
    scores = score(RESULTS, REFERENCES, meteor=False)
    assert list(scores) == WITHOUT_METEOR
    for key in WITHOUT_METEOR:
        assert scores[key] == pytest.approx(EXPECTED[key], abs=1e-6), key


def test_perfect_captions_score_like_perfect_captions():
    perfect = {image_id: captions[0] for image_id, captions in REFERENCES.items()}
    scores = score(perfect, REFERENCES, meteor=False)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr"] > 3.0


def test_only_result_images_are_scored():
    extra = {**REFERENCES, 999_999: ["An unrelated caption about a horse."]}
    assert score(RESULTS, extra, meteor=False) == score(RESULTS, REFERENCES, meteor=False)


def test_empty_results_are_an_error():
    with pytest.raises(CapfastError, match="empty"):
        score({}, REFERENCES, meteor=False)


def test_results_without_references_are_counted():
    results = {**RESULTS, 5: "a dog", 6: "a cat"}
    references = {**REFERENCES, 6: []}
    with pytest.raises(CapfastError, match="2 of 22 result image ids have no reference captions"):
        score(results, references, meteor=False)


def test_unknown_meteor_mode_is_a_programming_error():
    with pytest.raises(ValueError):
        score(RESULTS, REFERENCES, meteor="yes")


def test_without_java_meteor_is_skipped_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    monkeypatch.setattr(metrics, "_warned_meteor_skipped", False)
    with caplog.at_level(logging.WARNING, logger="capfast.eval.metrics"):
        first = score(RESULTS, REFERENCES)
        second = score(RESULTS, REFERENCES)
    assert "METEOR" not in first and first == second
    assert [r.getMessage() for r in caplog.records if "METEOR" in r.getMessage()] == [
        "METEOR skipped: `java` is not on PATH (pycocoevalcap's METEOR is a Java program)"]


def test_without_java_the_java_options_are_errors(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    with pytest.raises(CapfastError, match="ptb_java needs `java`"):
        score(RESULTS, REFERENCES, ptb_java=True, meteor=False)
    with pytest.raises(CapfastError, match="METEOR needs `java`"):
        score(RESULTS, REFERENCES, meteor=True)


def test_written_files_load_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    write_reference_annotations(REFERENCES, tmp_path / "refs.json")
    write_results(RESULTS, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())[0] == {"image_id": 139, "caption": RESULTS[139]}
    coco = COCO(str(tmp_path / "refs.json"))
    loaded = coco.loadRes(str(tmp_path / "results.json"))
    assert loaded.getImgIds() == list(RESULTS)
    assert [loaded.imgToAnns[i][0]["caption"] for i in RESULTS] == list(RESULTS.values())
    assert [a["caption"] for a in coco.imgToAnns[285]] == REFERENCES[285]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


@pytest.fixture(scope="module")
def meteor_jar():
    """One running meteor-1.5.jar (pycocoevalcap's Meteor) for this module: it takes ~13 s of CPU to start (its
    paraphrase tables), and it scores each EVAL line on its own, so the official pipeline and capfast's score()
    can share it. Patch pycocoevalcap's Meteor to return it where one is wanted."""
    from pycocoevalcap.meteor.meteor import Meteor

    jar = Meteor()
    yield jar
    jar.meteor_p.kill()  # capfast's score() stops the jar it used; otherwise it stops here
    jar.meteor_p.wait()


@pytest.fixture(scope="module")
def official(tmp_path_factory, meteor_jar):
    """COCOEvalCap's numbers for RESULTS, through the files a user would hand to the official pipeline."""
    import pycocoevalcap.eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    folder = tmp_path_factory.mktemp("official")
    write_reference_annotations(REFERENCES, folder / "refs.json")
    write_results(RESULTS, folder / "results.json")
    coco = COCO(str(folder / "refs.json"))
    loaded = coco.loadRes(str(folder / "results.json"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
        patch.setattr(pycocoevalcap.eval, "Meteor", lambda: meteor_jar)
        evaluation = pycocoevalcap.eval.COCOEvalCap(coco, loaded)
        evaluation.params["image_id"] = loaded.getImgIds()
        evaluation.evaluate()
    return {ours: evaluation.eval[theirs] for theirs, ours in OFFICIAL_NAMES.items()}


@needs_java
def test_frozen_numbers_are_the_official_ones(official):
    assert official == pytest.approx(EXPECTED, abs=1e-9)


@needs_java
def test_python_tokenizer_with_meteor_equals_official(official, meteor_jar, monkeypatch):
    import pycocoevalcap.meteor.meteor

    monkeypatch.setattr(pycocoevalcap.meteor.meteor, "Meteor", lambda: meteor_jar)  # the jar `official` used
    assert score(RESULTS, REFERENCES, meteor=True) == pytest.approx(official, abs=1e-9)


@needs_java
def test_java_tokenizer_equals_official(official):
    scores = score(RESULTS, REFERENCES, ptb_java=True, meteor=False)
    assert scores == pytest.approx({key: official[key] for key in WITHOUT_METEOR}, abs=1e-9)


@needs_java
def test_a_failing_meteor_jar_is_reported(monkeypatch, caplog):
    import pycocoevalcap.meteor.meteor

    monkeypatch.setattr(pycocoevalcap.meteor.meteor, "METEOR_JAR", "missing-meteor.jar")
    with pytest.raises(CapfastError, match="METEOR failed: .*missing-meteor.jar"):
        score(RESULTS, REFERENCES, meteor=True)
    with caplog.at_level(logging.WARNING, logger="capfast.eval.metrics"):
        scores = score(RESULTS, REFERENCES)
    assert "METEOR" not in scores and "METEOR left out" in caplog.text
