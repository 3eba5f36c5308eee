"""Tests for the text metrics: every expected value is worked out by hand in the comments beside it."""

from __future__ import annotations

import math

import pytest

from mmgpt.eval.metrics import (
    bleu4,
    caption_metrics,
    cider_d,
    cider_d_scores,
    exact_match,
    normalize_vqa_answer,
    perplexity,
    rouge_l,
    vqa_metrics,
    vqa_score,
)

# ---------------------------------------------------------------------------------------------------------------
# VQA normalisation and accuracy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # lowercase, then number word -> digit
        ("none", "0"),  # the official map sends "none" to "0" too
        ("the dog.", "dog"),  # article dropped, final period (no digit after it) deleted
        ("An  apple\t", "apple"),  # tab -> space, whitespace collapsed, "an" dropped
        ("It's red", "it's red"),  # apostrophes are not punctuation here; "it's" is not in the contraction map
        ("dont", "don't"),  # the contraction map restores missing apostrophes
        ("whats that", "what's that"),
        ("its tail", "its tail"),  # "its" is a possessive and stays as typed
        ("1,000", "1000"),  # a digit-comma-digit makes every mark vanish, so the number stays one token
        ("3.5", "3.5"),  # a period followed by a digit is kept (decimals)
        ("3.", "3"),  # ... but not one at the end: the official regex only looks ahead
        ("red,blue", "red blue"),  # a mark glued between words becomes a space
        ("red, blue", "red blue"),  # a mark next to a space is deleted
        ("t-shirt", "t shirt"),  # hyphens too: the official rule, not a choice of ours
        ("yes!", "yes"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected
    # Normalising twice changes nothing: references and predictions may arrive pre-normalised.
    assert normalize_vqa_answer(expected) == expected


# With k of 10 annotators matching, leave-one-out gives: the k subsets that drop a matching annotator see k-1
# matches, the 10-k that drop a non-matching one see k. Score = [k min(1,(k-1)/3) + (10-k) min(1,k/3)] / 10:
#   k=0: 0
#   k=1: [1*0   + 9*(1/3)] / 10 = 3/10  = 0.3
#   k=2: [2*1/3 + 8*(2/3)] / 10 = 6/10  = 0.6
#   k=3: [3*2/3 + 7*1    ] / 10 = 9/10  = 0.9
#   k=4: [4*1   + 6*1    ] / 10 = 1.0   (and so for every k >= 4)
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_score_ten_annotators(k: int, expected: float) -> None:
    answers = ["2"] * k + ["3"] * (10 - k)
    # "Two." normalises to "2": the match is counted after normalisation, on both sides.
    assert vqa_score("Two.", answers) == pytest.approx(expected)


def test_vqa_score_few_references() -> None:
    # One reference: plain exact match after normalisation (leave-one-out would always give 0).
    assert vqa_score("The Dog", ["dog"]) == 1.0
    assert vqa_score("cat", ["dog"]) == 0.0
    # Three references, two match: the two subsets without a match-er see 1 match (1/3 each), the subset without
    # the non-match-er sees 2 (2/3): (1/3 + 1/3 + 2/3) / 3 = 4/9.
    assert vqa_score("red", ["red", "red", "blue"]) == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_score("red", [])


def test_vqa_metrics_overall_and_per_qtype() -> None:
    preds = ["red", "two", "no", "blue"]
    answers = [["red"], "2", ["yes"], ["red"]]  # a bare string is one reference
    qtypes = ["color", "count", "yesno", "color"]
    out = vqa_metrics(preds, answers, qtypes)
    # Scores 1, 1, 0, 0 -> overall 2/4; color (1 + 0) / 2; count 1; yesno 0.
    assert out == pytest.approx({"vqa_acc": 0.5, "vqa_acc/color": 0.5, "vqa_acc/count": 1.0, "vqa_acc/yesno": 0.0})
    assert all(type(v) is float for v in out.values())
    # No qtypes: just the overall score. Empty qtypes get no key of their own.
    assert vqa_metrics(preds, answers) == pytest.approx({"vqa_acc": 0.5})
    assert set(vqa_metrics(preds, answers, ["", "", "", "color"])) == {"vqa_acc", "vqa_acc/color"}
    with pytest.raises(ValueError, match="3 qtypes for 4 predictions"):
        vqa_metrics(preds, answers, qtypes[:3])


# ---------------------------------------------------------------------------------------------------------------
# Exact match and perplexity
# ---------------------------------------------------------------------------------------------------------------


def test_exact_match() -> None:
    assert exact_match("  A red   Circle. ", "a red circle") == 1.0  # case, spaces, trailing period forgiven
    assert exact_match("a red circle", ["a blue square", "A red circle."]) == 1.0  # any reference will do
    assert exact_match("red circle", "a red circle") == 0.0  # unlike VQA normalisation, articles count
    assert exact_match("a red circle!", "a red circle") == 0.0  # only a period is forgiven
    assert exact_match("two", "2") == 0.0  # and number words are not mapped


def test_perplexity() -> None:
    # Mean NLL ln 2 per token -> perplexity 2 (a fair coin); zero NLL -> 1.
    assert perplexity(4 * math.log(2), 4) == pytest.approx(2.0)
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="n_tokens > 0"):
        perplexity(1.0, 0)


# ---------------------------------------------------------------------------------------------------------------
# BLEU-4 and ROUGE-L (torchmetrics, our tokenisation)
# ---------------------------------------------------------------------------------------------------------------


def test_bleu4_perfect_and_no_overlap() -> None:
    assert bleu4(["A cat sat on the mat."], [["a cat sat on the mat"]]) == pytest.approx(1.0)  # tokenised alike
    # Perfect against one of several references: clipping uses the max count over references, r the closest length.
    assert bleu4(["a cat sat on the mat"], [["a dog", "a cat sat on the mat"]]) == pytest.approx(1.0)
    assert bleu4(["dogs run fast today"], [["a cat sat on the mat"]]) == 0.0


def test_bleu4_partial_overlap_by_hand() -> None:
    # pred "a cat sat on the mat" (c=6) vs ref "a cat sat on the red mat" (r=7):
    #   1-grams: all 6 in ref                                       p1 = 6/6
    #   2-grams: a cat, cat sat, sat on, on the | the mat misses    p2 = 4/5
    #   3-grams: a cat sat, cat sat on, sat on the | on the mat     p3 = 3/4
    #   4-grams: a cat sat on, cat sat on the | sat on the mat      p4 = 2/3
    #   geometric mean (1 * 4/5 * 3/4 * 2/3)^(1/4) = 0.4^(1/4); c < r so BP = exp(1 - 7/6) = exp(-1/6).
    one = bleu4(["a cat sat on the mat"], [["a cat sat on the red mat"]])
    assert one == pytest.approx(0.4**0.25 * math.exp(-1 / 6), abs=1e-6)  # 0.67318
    # Corpus level adds a second pair, pred "a dog runs fast today" (c=5) vs ref "a dog runs fast" (r=4):
    #   matches/candidates per order: 4/5, 3/4, 2/3, 1/2. Summed with the first pair:
    #   p1 = 10/11, p2 = 7/9, p3 = 5/7, p4 = 3/5 -> product 1050/3465 = 10/33; c = 11 = r -> BP = exp(0) = 1.
    corpus = bleu4(
        ["a cat sat on the mat", "a dog runs fast today"], [["a cat sat on the red mat"], ["a dog runs fast"]]
    )
    assert corpus == pytest.approx((10 / 33) ** 0.25, abs=1e-6)  # 0.74194, not the mean of sentence BLEUs


def test_bleu4_clips_repeated_words() -> None:
    # "the the the the" vs "the cat": "the" is clipped to 1 of 4 (p1 = 1/4) and no bigram matches -> 0 overall.
    assert bleu4(["the the the the"], [["the cat"]]) == 0.0


def test_rouge_l_by_hand() -> None:
    assert rouge_l(["A cat, sitting."], [["a cat sitting"]]) == pytest.approx(1.0)
    assert rouge_l(["dogs run"], [["a cat sat"]]) == 0.0
    # pred "a cat sat on the mat" (6) vs ref "the cat sat on a red mat" (7): the LCS is "cat sat on mat" (4; "the"
    # and "a" appear in opposite orders so only one side of them could join, and neither extends the chain).
    # P = 4/6, R = 4/7, F1 = 2 * LCS / (6 + 7) = 8/13. The second reference shares nothing; "best" keeps 8/13.
    # A second prediction with no overlap scores 0, and the corpus score is the mean: (8/13 + 0) / 2 = 4/13.
    score = rouge_l(["a cat sat on the mat", "x y"], [["the cat sat on a red mat", "dogs run"], "z"])
    assert score == pytest.approx(4 / 13, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# CIDEr-D on tiny corpora
# ---------------------------------------------------------------------------------------------------------------
# Two images with references "a cat sits" and "a dog runs": N = 2, so idf(g) = ln 2 - ln max(1, df(g)).
#   "a" is in both reference sets: idf = ln2 - ln2 = 0.   Every other reference n-gram: df 1, idf = ln 2 =: L.
#   An n-gram in no reference (df 0 -> max(1, 0) = 1) also gets idf L: it only adds to the candidate's norm.
REFS = ["a cat sits", "a dog runs"]
L = math.log(2)


def test_cider_d_identical_caption() -> None:
    # Candidate == reference: orders 1..3 have equal vectors, cosine 1 each; a 3-word caption has no 4-grams, so
    # order 4 scores 0. 10 * mean(1, 1, 1, 0) = 7.5 for each image.
    assert cider_d_scores(REFS, REFS) == pytest.approx([7.5, 7.5])
    assert cider_d(REFS, REFS) == pytest.approx(7.5)


def test_cider_d_partial_overlap() -> None:
    # Image 2, candidate "a dog sits" vs "a dog runs" (same length, no penalty):
    #   n=1: cand {a: 0, dog: L, sits: L}, ref {a: 0, dog: L, runs: L}: dot L^2, norms L*sqrt2 each -> 1/2
    #   n=2: cand {a dog: L, dog sits: L (df 0)}, ref {a dog: L, dog runs: L}: dot L^2 / (2 L^2) -> 1/2
    #   n=3: "a dog sits" vs "a dog runs" -> 0;  n=4: none -> 0.   10 * (1/2 + 1/2) / 4 = 2.5
    scores = cider_d_scores(["a cat sits", "a dog sits"], REFS)
    assert scores == pytest.approx([7.5, 2.5])
    assert cider_d(["a cat sits", "a dog sits"], REFS) == pytest.approx(5.0)
    # Nothing in common: every dot product is 0.
    assert cider_d(["zebras graze", "kites fly"], REFS) == 0.0


def test_cider_d_length_penalty() -> None:
    # Image 1, candidate "a cat sits on the mat" (6 words, 5 bigrams) vs "a cat sits" (3 words, 2 bigrams):
    #   n=1: cand {a: 0, cat, sits, on, the, mat: L each} norm L*sqrt5; ref {cat, sits: L} norm L*sqrt2; dot 2L^2
    #        -> 2/sqrt10
    #   n=2: cand 5 bigrams at L (norm L*sqrt5), ref {a cat, cat sits} (norm L*sqrt2), 2 shared -> 2/sqrt10
    #   n=3: cand 4 trigrams (norm 2L), ref {a cat sits} (norm L), 1 shared -> 1/2
    #   n=4: ref has none -> 0
    #   without penalty: 10 * (4/sqrt10 + 1/2) / 4 = 4.4123; delta = 5 - 2 = 3 -> x exp(-9 / 72) = x 0.8825
    no_penalty = 10 * (4 / math.sqrt(10) + 0.5) / 4
    preds = ["a cat sits on the mat", "a dog runs"]
    assert cider_d_scores(preds, REFS)[0] == pytest.approx(no_penalty * math.exp(-9 / 72))  # 3.8938
    # A huge sigma switches the penalty off and leaves the plain clipped cosine.
    assert cider_d_scores(preds, REFS, sigma=1e9)[0] == pytest.approx(no_penalty)


def test_cider_d_clips_repeated_words() -> None:
    # Image 1, candidate "cat cat cat" vs "a cat sits" (same length, no penalty):
    #   n=1: cand {cat: 3L} (norm 3L), ref {a: 0, cat: L, sits: L} (norm L*sqrt2).
    #        clipped dot = min(3L, L) * L = L^2 -> 1 / (3 sqrt2). (Unclipped it would be 3L^2 -> 1/sqrt2.)
    #   n=2: {cat cat: 2L} vs {a cat, cat sits} -> 0;  n=3: 0;  n=4: none.
    #   10 * (1 / (3 sqrt2)) / 4 = 0.5893
    scores = cider_d_scores(["cat cat cat", "a dog runs"], REFS)
    # Without clipping the cosine would ignore the repetition and give 10 * (1/sqrt2) / 4 = 1.77, three times more.
    assert scores == pytest.approx([10 / (12 * math.sqrt(2)), 7.5])


def test_cider_d_averages_over_references_and_df_counts_images() -> None:
    # Image 1 has refs "a cat sits" and "a cat runs"; image 2 has "a dog runs". Now "a" and "runs" are in both
    # images' reference sets (idf 0); "a cat" counts once for image 1 although two of its references contain it.
    # Image 1, candidate "a cat sits":
    #   vs "a cat sits": orders 1..3 cosine 1, order 4 none -> (1, 1, 1, 0)
    #   vs "a cat runs": n=1 cand {cat: L, sits: L} . ref {cat: L, runs: 0} = L^2 / (L sqrt2 * L) = 1/sqrt2
    #                    n=2 {a cat, cat sits} . {a cat, cat runs} = L^2 / (2 L^2) = 1/2;  n=3, n=4 -> 0
    #   mean over orders, then over the 2 references: 10 * ((3 + 1/sqrt2 + 1/2) / 4) / 2 = 5.2589
    # Image 2, "a dog runs" vs itself: unigram vector {dog: L} only, still cosine 1 -> 7.5.
    scores = cider_d_scores(["a cat sits", "a dog runs"], [["a cat sits", "a cat runs"], "a dog runs"])
    assert scores == pytest.approx([10 * (3.5 + 1 / math.sqrt(2)) / 8, 7.5])


def test_cider_d_single_image_corpus_is_zero() -> None:
    # With one image every reference n-gram has df = N = 1 and idf ln1 - ln1 = 0: CIDEr-D needs a corpus.
    assert cider_d(["a cat sits"], ["a cat sits"]) == 0.0


def test_caption_metrics_and_input_checks() -> None:
    out = caption_metrics(REFS, REFS)
    assert out == pytest.approx({"bleu4": 0.0, "cider_d": 7.5, "rouge_l": 1.0, "exact_match": 1.0})
    # bleu4 is 0 although both captions are perfect: 3-word captions have no 4-grams, so p4 = 0/0 -> no match.
    assert all(type(v) is float for v in out.values())
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        caption_metrics(REFS, REFS[:1])
    with pytest.raises(ValueError, match="prediction 1 has an empty reference list"):
        cider_d(REFS, [["a cat sits"], []])
    with pytest.raises(ValueError, match="no predictions"):
        bleu4([], [])
