"""Evaluation metrics for generated text: VQA accuracy, exact match, BLEU-4, ROUGE-L, CIDEr-D and perplexity.

VQA follows the official VQAv2 evaluation script (answer normalisation and the leave-one-out soft accuracy).
Captions are tokenised once, the same way for every caption metric (lowercase, punctuation deleted, split on
whitespace), a light stand-in for coco-caption's PTB tokenizer that needs no Java. BLEU and ROUGE-L come from
torchmetrics; CIDEr-D is written here, following coco-caption's ``ciderD_scorer.py`` line for line in behaviour.
All public functions return plain Python floats so the results can go straight to a logger or a JSON file.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence

from torchmetrics.functional.text import bleu_score, rouge_score

# ---------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (official VQAv2 rules)
# ---------------------------------------------------------------------------------------------------------------

# The official script's punctuation list. Apostrophes, colons, periods and a few others are deliberately absent:
# apostrophes must survive for the contraction map below, and periods get their own rule (decimals).
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_NUMBER_COMMA = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a lookahead (a typo for a lookbehind) that
# always passes before a ".", so the rule really is "delete every period not followed by a digit". We mirror
# that behaviour: "3.5" keeps its period, "dog." and "3." lose theirs.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# The official contraction map: annotators often typed contractions without the apostrophe ("dont"), so the
# script puts it back ("don't") and both spellings score the same. Dropped from the official table: the four
# capitalised keys ("Im", "Ive", "Id've", "I'dve"), which can never fire because words are lowercased first, and
# the identity entries ("let's", "she's"). "it's"/"its" are not in the table: "its" stays a possessive.
# The odd "somebody'd" -> "somebodyd" entry is official; since we normalise both sides it is harmless.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip


def _vqa_strip_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, keep periods inside decimals."""
    # A text with a digit-comma-digit ("1,000") loses every mark outright, so the number stays one token.
    has_number_comma = _NUMBER_COMMA.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        # A mark already next to a space ("red, blue") is deleted; one glued between words ("red/blue") becomes a
        # space so the words stay apart. The test looks at the original text, not the partly cleaned one, as the
        # official script does.
        touches_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if has_number_comma or touches_space else " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(s: str) -> str:
    """Normalise a VQA answer with the official VQAv2 evaluation rules.

    In order: newlines/tabs to spaces; punctuation deleted or turned into spaces (a comma between digits is
    deleted, "1,000" -> "1000"; a period is deleted unless a digit follows, "3.5" stays); lowercase; number words
    zero..ten (and "none") to digits; articles "a", "an", "the" removed; apostrophe-less contractions restored
    ("dont" -> "don't"); whitespace collapsed to single spaces.

    Args:
        s: a predicted or reference answer.

    Returns:
        The normalised answer, e.g. ``"Two dogs."`` -> ``"2 dogs"``.
    """
    text = _vqa_strip_punctuation(s.replace("\n", " ").replace("\t", " ").strip())
    words = [_DIGIT_WORDS.get(w, w) for w in text.lower().split()]
    # Digits first, then articles: the official order, so "none" becomes "0" rather than surviving as a word.
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction: exact match for one reference, VQAv2 soft accuracy for several.

    With n >= 2 references (VQAv2 has 10, from 10 annotators), the official score averages over the n
    leave-one-out subsets: for each reference i, count the matches among the *other* n-1 references and score
    ``min(matches / 3, 1)``; the answer is the mean of those n values. "3 humans agreeing is full credit", made
    robust to which annotator is left out. With k matches among 10 references, the k matching subsets see k-1
    matches and the 10-k others see k, so 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9 and 4 or more -> 1.0.

    Both the prediction and the references go through :func:`normalize_vqa_answer`. (The official script only
    normalises when the annotators disagree; its reference answers are already clean, and normalising always
    keeps a prediction like "Two" from scoring 0 against "2".)

    Args:
        prediction: the generated answer.
        answers: the reference answers, one per annotator.

    Returns:
        The accuracy in [0, 1].
    """
    if len(answers) == 0:
        raise ValueError("vqa_score needs at least one reference answer, got an empty list")
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(a) == pred for a in answers]
    if len(hits) == 1:
        # Leave-one-out on one reference would leave nothing to match, so the score would always be 0.
        return float(hits[0])
    total = sum(hits)
    # Leaving reference i out removes its own hit (if any) from the count.
    return sum(min((total - hit) / 3.0, 1.0) for hit in hits) / len(hits)


def _light_normalize(s: str) -> str:
    """Lowercase, collapse whitespace and drop one trailing period: forgiving about form, strict about words."""
    s = " ".join(s.lower().split())
    return s[:-1].rstrip() if s.endswith(".") else s


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the prediction equals any reference after light normalisation, else 0.0.

    Light normalisation: strip, lowercase, collapse whitespace, remove one trailing period. Unlike
    :func:`normalize_vqa_answer` it keeps articles and number words ("a red circle" != "red circle").

    Args:
        prediction: the generated text.
        references: one reference or a list of them.

    Returns:
        1.0 or 0.0.
    """
    refs = [references] if isinstance(references, str) else references
    pred = _light_normalize(prediction)
    return float(any(_light_normalize(r) == pred for r in refs))


# ---------------------------------------------------------------------------------------------------------------
# Caption metrics
# ---------------------------------------------------------------------------------------------------------------

_DELETE_PUNCT = str.maketrans("", "", string.punctuation)


def _caption_tokens(s: str) -> list[str]:
    """Lowercase, delete ASCII punctuation, split on whitespace: "A dog's ball." -> ["a", "dogs", "ball"]."""
    # Deleting (not spacing) keeps hyphenated words one token, as PTB does: "black-and-white" -> "blackandwhite".
    return s.lower().translate(_DELETE_PUNCT).split()


def _as_reference_lists(references_list: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Accept a bare string as a one-reference list, so single-target datasets need no wrapping."""
    return [[refs] if isinstance(refs, str) else list(refs) for refs in references_list]


def _check_corpus(predictions: Sequence[str], references_list: list[list[str]], metric: str) -> None:
    if len(predictions) != len(references_list):
        raise ValueError(
            f"{metric}: got {len(predictions)} predictions but {len(references_list)} reference lists; "
            f"expected one reference list per prediction"
        )
    if len(predictions) == 0:
        raise ValueError(f"{metric}: got no predictions; the score of an empty corpus is undefined")
    for i, refs in enumerate(references_list):
        if len(refs) == 0:
            raise ValueError(f"{metric}: prediction {i} has an empty reference list; expected at least one")


def bleu4(predictions: Sequence[str], references_list: Sequence[str | Sequence[str]]) -> float:
    """Corpus-level BLEU-4 (uniform weights, no smoothing) via torchmetrics.

    Corpus level means clipped n-gram matches and candidate n-gram counts are summed over all sentences before
    the precisions are taken, and the brevity penalty ``exp(1 - r/c)`` (when ``c <= r``) uses the total
    candidate length c and the sum over sentences of the reference length closest to each candidate. With
    several references, each n-gram's count is clipped by its largest count in any one reference. Without
    smoothing the score is exactly 0 if some n-gram order has no match in the whole corpus (coco-caption
    instead reports a tiny positive number); on a tie in closest reference length torchmetrics takes the
    first reference listed, coco-caption the shorter one.

    Args:
        predictions: one generated caption per image.
        references_list: per image, its reference captions (or a single string).

    Returns:
        BLEU-4 in [0, 1].
    """
    refs = _as_reference_lists(references_list)
    _check_corpus(predictions, refs, "bleu4")
    # torchmetrics splits on whitespace, so we hand it text that is already tokenised our way.
    preds = [" ".join(_caption_tokens(p)) for p in predictions]
    targets = [[" ".join(_caption_tokens(r)) for r in rs] for rs in refs]
    return float(bleu_score(preds, targets, n_gram=4))


def _identity(s: str) -> str:
    return s


def rouge_l(predictions: Sequence[str], references_list: Sequence[str | Sequence[str]]) -> float:
    """ROUGE-L F1 via torchmetrics: per prediction the best over its references, then the mean over predictions.

    For one pair, with LCS the longest common subsequence of tokens: P = LCS / len(pred), R = LCS / len(ref),
    F1 = 2PR / (P + R). (coco-caption's ROUGE-L differs: it takes the max P and max R over references separately
    and combines them with beta = 1.2.)

    Args:
        predictions: one generated caption per image.
        references_list: per image, its reference captions (or a single string).

    Returns:
        ROUGE-L F1 in [0, 1].
    """
    refs = _as_reference_lists(references_list)
    _check_corpus(predictions, refs, "rouge_l")
    # torchmetrics' default normaliser turns apostrophes into spaces ("dog's" -> "dog s"); we pass our own
    # tokenizer (and a no-op normaliser, which would otherwise run first) so every caption metric sees one tokenisation.
    scores = rouge_score(
        list(predictions),
        refs,
        rouge_keys="rougeL",
        accumulate="best",
        normalizer=_identity,
        tokenizer=_caption_tokens,
    )
    return float(scores["rougeL_fmeasure"])


def _ngram_counts(tokens: list[str], n_max: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..n_max-gram of a token list, all orders in one Counter."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, n_max + 1):
        counts.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return counts


def cider_d_scores(
    predictions: Sequence[str], references_list: Sequence[str | Sequence[str]], sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D, as coco-caption's ``ciderD_scorer.py`` (Vedantam et al., CVPR 2015).

    For each n in 1..4, a caption becomes a TF-IDF vector over its n-grams: weight ``tf * idf`` with
    ``idf = log(N_images) - log(max(1, df))``, where df counts the images whose *reference set* contains the
    n-gram (candidates never feed df; an n-gram seen in no reference gets df 1, i.e. the largest idf, which
    only enlarges the candidate's norm). Against each reference, the order-n similarity is
    ``sum_g min(c_g, r_g) * r_g / (|c| |r|)`` — a cosine whose candidate weights are clipped by the reference's,
    so repeating a word earns nothing — times the Gaussian length penalty ``exp(-delta^2 / (2 sigma^2))``.
    The image's score is 10 x the mean over n of the similarity averaged over references.

    As coco-caption: delta is the difference in *bigram* counts (equal to the word-count difference unless a
    caption is empty); an order whose vector is all zero on either side scores 0 for that order, so a
    three-word caption can reach at most 7.5; and a one-image corpus scores 0 everywhere, since every
    reference n-gram then has idf log(1) - log(1) = 0.

    Args:
        predictions: one generated caption per image.
        references_list: per image, its reference captions (or a single string).
        sigma: width of the length penalty, in tokens; 6 in CIDEr-D.

    Returns:
        One score per image, each in [0, 10].
    """
    n_max = 4
    refs = _as_reference_lists(references_list)
    _check_corpus(predictions, refs, "cider_d")
    cand_counts = [_ngram_counts(_caption_tokens(p), n_max) for p in predictions]
    ref_counts = [[_ngram_counts(_caption_tokens(r), n_max) for r in rs] for rs in refs]

    # Document frequency: each image counts once per n-gram, however many of its references contain it.
    df: Counter[tuple[str, ...]] = Counter()
    for counts in ref_counts:
        df.update(set().union(*counts))
    log_n_images = math.log(len(ref_counts))

    def tfidf(counts: Counter[tuple[str, ...]]) -> tuple[dict[tuple[str, ...], float], list[float], int]:
        vec = {g: tf * (log_n_images - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
        sq_norms = [0.0] * n_max
        for g, w in vec.items():
            sq_norms[len(g) - 1] += w * w
        n_bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, [math.sqrt(s) for s in sq_norms], n_bigrams

    scores = []
    for cand, image_refs in zip(cand_counts, ref_counts, strict=True):
        c_vec, c_norms, c_len = tfidf(cand)
        per_order = [0.0] * n_max  # summed over references
        for ref in image_refs:
            r_vec, r_norms, r_len = tfidf(ref)
            penalty = math.exp(-((c_len - r_len) ** 2) / (2 * sigma**2))
            dots = [0.0] * n_max
            for g, w in c_vec.items():
                r_w = r_vec.get(g, 0.0)
                dots[len(g) - 1] += min(w, r_w) * r_w
            for k in range(n_max):
                if c_norms[k] > 0 and r_norms[k] > 0:
                    per_order[k] += dots[k] / (c_norms[k] * r_norms[k]) * penalty
        scores.append(10.0 * sum(per_order) / n_max / len(image_refs))
    return scores


def cider_d(predictions: Sequence[str], references_list: Sequence[str | Sequence[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_d_scores` over images (idf from this corpus's references).

    Args:
        predictions: one generated caption per image.
        references_list: per image, its reference captions (or a single string).
        sigma: width of the length penalty, in tokens; 6 in CIDEr-D.

    Returns:
        CIDEr-D in [0, 10]; papers usually report it x100 (e.g. "CIDEr 120" is 1.20 here).
    """
    scores = cider_d_scores(predictions, references_list, sigma=sigma)
    return sum(scores) / len(scores)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """Perplexity from a summed token negative log-likelihood (natural log): ``exp(total_nll / n_tokens)``.

    Sum the NLL and the token count over the whole set first, then call this once: the mean of per-batch
    perplexities is not the perplexity of the set.

    Args:
        total_nll: sum over tokens of ``-log p(token)``, in nats (a float or a 0-d tensor).
        n_tokens: number of tokens in that sum.

    Returns:
        The perplexity (``inf`` if the mean NLL overflows ``exp``).
    """
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs n_tokens > 0, got {n_tokens}")
    try:
        return math.exp(float(total_nll) / n_tokens)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------


def caption_metrics(predictions: Sequence[str], references_list: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """All caption metrics for one corpus.

    Args:
        predictions: one generated caption per image.
        references_list: per image, its reference captions (or a single string).

    Returns:
        ``{"bleu4", "cider_d", "rouge_l", "exact_match"}``; exact_match is the fraction of predictions equal
        to one of their references.
    """
    refs = _as_reference_lists(references_list)
    _check_corpus(predictions, refs, "caption_metrics")
    return {
        "bleu4": bleu4(predictions, refs),
        "cider_d": cider_d(predictions, refs),
        "rouge_l": rouge_l(predictions, refs),
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, refs, strict=True)) / len(predictions),
    }


def vqa_metrics(
    predictions: Sequence[str],
    answers_list: Sequence[str | Sequence[str]],
    qtypes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean VQA accuracy overall and per question type.

    Args:
        predictions: one generated answer per question.
        answers_list: per question, its reference answers (or a single string).
        qtypes: per question, its type (e.g. ``"color"``); empty strings are counted only in the overall score.

    Returns:
        ``{"vqa_acc": overall, "vqa_acc/<qtype>": mean over that type's questions, ...}``.
    """
    answers = _as_reference_lists(answers_list)
    _check_corpus(predictions, answers, "vqa_metrics")
    if qtypes is not None and len(qtypes) != len(predictions):
        raise ValueError(f"vqa_metrics: got {len(qtypes)} qtypes for {len(predictions)} predictions; expected one each")
    scores = [vqa_score(p, a) for p, a in zip(predictions, answers, strict=True)]
    out = {"vqa_acc": sum(scores) / len(scores)}
    by_type: defaultdict[str, list[float]] = defaultdict(list)
    for qtype, score in zip(qtypes if qtypes is not None else [""] * len(scores), scores, strict=True):
        if qtype:
            by_type[qtype].append(score)
    for qtype in sorted(by_type):
        out[f"vqa_acc/{qtype}"] = sum(by_type[qtype]) / len(by_type[qtype])
    return out
