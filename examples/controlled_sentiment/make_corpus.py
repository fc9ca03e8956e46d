"""Generate the demo's corpus: short, varied, mixed-sentiment movie-review-like texts.

The DPO paper's controlled-sentiment task (section 6.1) prompts a model with the first
words of an IMDb review and asks for a positive continuation. prefopt's demo runs a
miniature of it with nothing downloaded, so it needs reviews it can ship: this script
writes them from templates and word lists. Each review has two to four sentences about
different aspects of a film (acting, plot, music, ...); each sentence's sentiment is
drawn on its own from the review's overall tone, so most reviews mix praise and
complaint, as real ones do, and a model trained on them writes both.

The output is deterministic for a seed and is committed as prefopt/resources/reviews.txt
(one review per line):

    python examples/controlled_sentiment/make_corpus.py            # rewrite the shipped file
    python examples/controlled_sentiment/make_corpus.py -n 500 -o /tmp/reviews.txt
"""
from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

KINDS = ["movie", "film", "comedy", "drama", "thriller", "western", "musical", "horror film", "romance",
         "sequel", "remake", "documentary", "war film", "mystery", "cartoon", "spy film", "road movie"]
ASPECTS = ["acting", "plot", "story", "script", "dialogue", "music", "soundtrack", "ending", "pacing",
           "direction", "camera work", "cast", "humor", "lighting", "editing", "opening scene", "final act",
           "costume design", "score", "romance", "villain", "main character"]
PEOPLE = ["the lead actor", "the lead actress", "the villain", "the young star", "the supporting cast",
          "the director", "the old sheriff", "the narrator", "the hero", "the little girl", "the detective",
          "the whole cast", "the singer", "the mother", "the captain"]
THINGS = ["story", "ride", "experience", "evening", "mess", "picture", "effort", "debut", "adventure", "watch"]

POS = ["great", "wonderful", "brilliant", "excellent", "beautiful", "amazing", "charming", "fantastic", "superb",
       "delightful", "lovely", "moving", "funny", "enjoyable", "impressive", "good", "nice", "perfect", "clever",
       "fresh", "warm", "gorgeous", "sweet", "fine", "strong", "fun"]
NEG = ["terrible", "awful", "boring", "dull", "horrible", "weak", "bad", "poor", "stupid", "painful", "ugly",
       "annoying", "disappointing", "lazy", "silly", "tedious", "messy", "flat", "cheap", "clumsy", "pathetic",
       "dreadful", "lame", "sloppy"]
NEUTRAL = ["long", "short", "quiet", "loud", "slow", "fast", "simple", "strange", "old fashioned", "dark",
           "familiar", "unusual", "serious", "predictable", "busy", "modern"]
INTENS = ["", "", "", "really ", "very ", "quite ", "truly ", "pretty ", "so ", "rather ", "incredibly "]
POS_VERBS = ["loved", "enjoyed", "adored", "liked", "admired", "treasured"]
NEG_VERBS = ["hated", "disliked", "regretted", "resented", "could not stand"]

# Openings that need an "and ..." continuation, and openings that end on a copula.
ACTION_OPENINGS = [
    "I watched this {kind}", "My friends and I saw this {kind}", "I rented this {kind}", "We saw this {kind}",
    "Last night I watched this {kind}", "I went to this {kind}", "My wife picked this {kind}",
    "I expected a lot from this {kind}", "We finally caught this {kind}",
]
COPULA_OPENINGS = [
    "This {kind} was", "The {kind} is", "Honestly, this {kind} was", "After all the hype, this {kind} was",
    "Well, this {kind} is", "So this {kind} was", "The new {kind} is", "In my opinion this {kind} is",
]
ACTION_TAILS = {
    "pos": ["and it was {i}{a}.", "and I {v} it.", "and it was a {a} {t}.", "and it turned out {i}{a}."],
    "neg": ["and it was {i}{a}.", "and I {v} it.", "and it was a {a} {t}.", "and it turned out {i}{a}."],
    "neu": ["on a rainy sunday.", "with my brother.", "at the old cinema downtown.", "on a long flight.",
            "after reading the book.", "last weekend.", "without knowing anything about it."],
}
COPULA_TAILS = {
    "pos": ["{i}{a}.", "a {a} {t}.", "{i}{a} from start to finish.", "{a} and {a2}."],
    "neg": ["{i}{a}.", "a {a} {t}.", "{i}{a} from start to finish.", "{a} and {a2}."],
    "neu": ["{n}.", "about a {job} in a small town.", "{n} and {n2}.", "longer than I expected.",
            "based on a true story."],
}

SENTENCES = {
    "pos": [
        "The {asp} was {i}{a}.", "The {asp} is {i}{a}.", "I found the {asp} {i}{a}.",
        "{P} gives a {a} performance.", "{P} was {i}{a}.", "The {asp} felt {a} and {a2}.",
        "What a {a} {t}!", "I {v} the {asp}.", "Every scene with {p} is {a}.",
        "The {asp} alone makes it worth seeing.", "It made me laugh and cry.", "I smiled the whole time.",
        "The {asp} stayed with me for days.", "It is a {a} {kind} for the whole family.",
    ],
    "neg": [
        "The {asp} was {i}{a}.", "The {asp} is {i}{a}.", "I found the {asp} {i}{a}.",
        "{P} gives a {a} performance.", "{P} was {i}{a}.", "The {asp} felt {a} and {a2}.",
        "What a {a} {t}!", "I {v} the {asp}.", "Every scene with {p} is {a}.",
        "The {asp} ruins the whole thing.", "I almost fell asleep.", "I wanted my money back.",
        "The {asp} made no sense at all.", "It is a {a} waste of time.",
    ],
    "neu": [
        "The {asp} is {n}.", "It runs about two hours.", "{P} plays a {job} in a small town.",
        "The story follows {p} across the country.", "It was shot in black and white.",
        "The {asp} reminded me of older films.", "Most of it takes place at night.",
        "There is a long scene on a train.", "The {asp} is {n} and {n2}.", "{P} barely speaks.",
    ],
}
JOBS = ["teacher", "farmer", "soldier", "doctor", "painter", "cook", "pilot", "lawyer", "nurse", "thief"]
MIXED_JOINS = ["The {asp} was {a}, but the {asp2} was {b}.", "{P} is {a}, yet the {asp} is {b}.",
               "I {v} the {asp}, but the {asp2} was {b}.", "The {asp} is {a} even if the {asp2} is {b}."]
CLOSINGS = {
    "pos": ["Highly recommended.", "I would watch it again.", "Go see it.", "Ten out of ten.",
            "A {a} night at the movies.", "Worth every penny.", "Overall, a {a} {kind}.", "Eight out of ten."],
    "neg": ["Skip this one.", "Not worth the ticket.", "Two out of ten.", "Avoid it.",
            "Overall, a {a} {kind}.", "What a waste.", "I would not recommend it.", "One out of ten."],
    "neu": ["Make of that what you will.", "Five out of ten.", "It is what it is.", "Judge for yourself.",
            "That is all I can say.", "Six out of ten."],
}
# Overall tone of a review -> probabilities of (pos, neg, neu) for each sentence.
TONES = {"positive": (0.65, 0.15, 0.20), "negative": (0.15, 0.65, 0.20), "mixed": (0.40, 0.40, 0.20)}


def _fill(template: str, rng: random.Random, sentiment: str, kind: str, capitalize: bool = True) -> str:
    words = {"pos": POS, "neg": NEG}.get(sentiment, NEUTRAL)
    a, a2 = rng.sample(words, 2)
    asp, asp2 = rng.sample(ASPECTS, 2)
    person = rng.choice(PEOPLE)
    verbs = POS_VERBS if sentiment == "pos" else NEG_VERBS
    n, n2 = rng.sample(NEUTRAL, 2)
    text = template.format(kind=kind, a=a, a2=a2, asp=asp, asp2=asp2, p=person, P=person[0].upper() + person[1:],
                           i=rng.choice(INTENS), v=rng.choice(verbs), t=rng.choice(THINGS), n=n, n2=n2,
                           job=rng.choice(JOBS))
    return text[0].upper() + text[1:] if capitalize else text


def _mixed(rng: random.Random, kind: str) -> str:
    first, second = ("pos", "neg") if rng.random() < 0.5 else ("neg", "pos")
    template = rng.choice(MIXED_JOINS)
    a = rng.choice(POS if first == "pos" else NEG)
    b = rng.choice(NEG if first == "pos" else POS)
    asp, asp2 = rng.sample(ASPECTS, 2)
    person = rng.choice(PEOPLE)
    verb = rng.choice(POS_VERBS if first == "pos" else NEG_VERBS)
    text = template.format(a=a, b=b, asp=asp, asp2=asp2, P=person[0].upper() + person[1:], v=verb)
    return text[0].upper() + text[1:]


def review(rng: random.Random) -> str:
    tone = rng.choice(list(TONES))
    probs = TONES[tone]

    def draw() -> str:
        return rng.choices(["pos", "neg", "neu"], weights=probs)[0]

    kind = rng.choice(KINDS)
    s = draw()
    if rng.random() < 0.5:
        opening, tail = rng.choice(ACTION_OPENINGS), rng.choice(ACTION_TAILS[s])
    else:
        opening, tail = rng.choice(COPULA_OPENINGS), rng.choice(COPULA_TAILS[s])
    parts = [opening.format(kind=kind) + " " + _fill(tail, rng, s, kind, capitalize=False)]
    for _ in range(rng.randint(1, 2)):
        if tone == "mixed" and rng.random() < 0.35:
            parts.append(_mixed(rng, kind))
        else:
            s = draw()
            parts.append(_fill(rng.choice(SENTENCES[s]), rng, s, kind))
    if rng.random() < 0.7:
        s = draw()
        parts.append(_fill(rng.choice(CLOSINGS[s]), rng, s, kind))
    return _articles(" ".join(parts))


def _articles(text: str) -> str:
    """'a' before a vowel becomes 'an'."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct reviews, deterministic for ``seed``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        r = review(rng)
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--num-reviews", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    default = Path(__file__).resolve().parents[2] / "prefopt" / "resources" / "reviews.txt"
    parser.add_argument("-o", "--output", type=Path, default=default)
    args = parser.parse_args()
    reviews = make_corpus(args.num_reviews, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(reviews) + "\n", encoding="utf-8")
    size = args.output.stat().st_size
    print(f"wrote {len(reviews)} reviews ({size / 1024:.0f} KiB) to {args.output}")


if __name__ == "__main__":
    main()
