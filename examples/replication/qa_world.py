"""A procedural multi-hop QA task in the generic input schema of ``solopo-data``.

Every question is about invented people. Each person has a short biography (the passage title is
the person's name), written in one fixed style::

    Kaldo Venmir
    Kaldo Venmir was born in Drelton . Kaldo Venmir lives in Sarvik . Kaldo Venmir works for
    Quorix . Kaldo Venmir is married to Lina Orvath . Kaldo Venmir was trained by Mira Tolsen .

A one-hop question asks for an attribute of one person (``Where was Kaldo Venmir born ?``); its
relevant passage is that person's biography. A two-hop question goes through a spouse or a
mentor (``Where was the spouse of Kaldo Venmir born ?``); its relevant passages are both
biographies, in random order. Every biography has the same attributes, so in the short context a
two-hop question can be answered wrongly with the first person's attribute, and in the long
context, where ``build-contexts`` buries the relevant biographies among other people's, the
model has to find the right ones by name: the evidence is there but buried, and the distractors
look exactly like it.

Consistency: within a split every full name is unique (one person, one biography), so no two
passages of a file contradict each other and ``build-contexts``' distractor pool (every passage
of the file) never holds a second, different biography of a question's person. Names, cities and
companies come from fixed word lists shared by all splits (the model must know their tokens), but
the facts are drawn afresh for every person: the only way to answer is to read the passages.

Each example also carries two unrelated biographies in ``distractors``: they enlarge the pool, so
that long contexts of a few thousand tokens can be filled from a hundred questions, and the
starting model's fine-tuning mixes a few of them into its short prompts.

Answers come with a chain-of-thought reference response (``reference`` field, ignored by
``solopo-data``): the supporting sentences, copied, then ``The answer is X .``; the starting
model is fine-tuned on these.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ONSETS = "b d f g k l m n p r s t v z br dr gr kr st tr".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "", "n", "r", "l", "s", "th", "m"]

#: The attributes every biography has: name -> (sentence, question), with ``{p}`` the person and
#: ``{v}`` the value.
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "born": ("{p} was born in {v} .", "Where was {p} born ?"),
    "lives": ("{p} lives in {v} .", "Where does {p} live ?"),
    "works": ("{p} works for {v} .", "Which company does {p} work for ?"),
}
#: The relations to another person: name -> (sentence, noun used in two-hop questions).
BRIDGES: dict[str, tuple[str, str]] = {
    "spouse": ("{p} is married to {v} .", "spouse"),
    "mentor": ("{p} was trained by {v} .", "mentor"),
}
ONE_HOP_BRIDGE_QUESTIONS = {
    "spouse": "Who is {p} married to ?",
    "mentor": "Who trained {p} ?",
}


def _words(rng: random.Random, count: int, syllables: int, taken: set[str]) -> list[str]:
    """``count`` new pronounceable invented words of ``syllables`` syllables, capitalised."""
    words: list[str] = []
    while len(words) < count:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
        word = ("".join(parts) + rng.choice(_CODAS)).capitalize()
        if word.lower() not in taken:
            taken.add(word.lower())
            words.append(word)
    return words


@dataclass(frozen=True)
class Lexicon:
    """The word lists of the world (shared by all splits; fixed by ``seed``)."""

    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    cities: tuple[str, ...]
    companies: tuple[str, ...]

    @classmethod
    def build(
        cls, *, names: int = 80, cities: int = 60, companies: int = 40, seed: int = 0
    ) -> Lexicon:
        rng = random.Random(f"lexicon/{seed}")
        # Template and glue words are never reused as invented words.
        taken = set(
            "a an the in is to by was for of and at be do on or so as it he we me us no go "
            "lives born works married trained where who which does live work answer question "
            "passages given based following step think end final are with then".split()
        )
        return cls(
            first_names=tuple(_words(rng, names, 2, taken)),
            last_names=tuple(_words(rng, names, 2, taken)),
            cities=tuple(_words(rng, cities, 3, taken)),
            companies=tuple(_words(rng, companies, 2, taken)),
        )

    def words(self) -> list[str]:
        """Every word a question, passage or answer can contain (for the tokenizer)."""
        glue = " ".join(
            [*(s for s, _ in ATTRIBUTES.values()), *(q for _, q in ATTRIBUTES.values())]
            + [s for s, _ in BRIDGES.values()]
            + list(ONE_HOP_BRIDGE_QUESTIONS.values())
            + ["the spouse mentor of The answer is ."]
        )
        glue_words = glue.replace("{p}", " ").replace("{v}", " ").split()
        return sorted(
            {*glue_words, *self.first_names, *self.last_names, *self.cities, *self.companies}
        )


@dataclass
class Person:
    """One invented person: a unique full name, three attributes and two other people."""

    name: str
    born: str
    lives: str
    works: str
    spouse: str
    mentor: str

    def biography(self, rng: random.Random) -> dict[str, str]:
        """The person's passage, ``{"title", "text"}``, its sentences in random order."""
        sentences = [self.sentence(key) for key in (*ATTRIBUTES, *BRIDGES)]
        rng.shuffle(sentences)
        return {"title": self.name, "text": " ".join(sentences)}

    def sentence(self, key: str) -> str:
        template = ATTRIBUTES[key][0] if key in ATTRIBUTES else BRIDGES[key][0]
        return template.format(p=self.name, v=getattr(self, key))


class _People:
    """Draws people with unique full names (within one split).

    The shuffled name grid is cut in two: people who get a biography take names from the first
    part, one each; the spouses and mentors who are only mentioned take names from the second
    part (with repetition), so a mention never names someone who has a biography.
    """

    def __init__(self, lexicon: Lexicon, rng: random.Random, people: int) -> None:
        self.lexicon = lexicon
        self.rng = rng
        names = [
            f"{f} {la}" for f, la in itertools.product(lexicon.first_names, lexicon.last_names)
        ]
        if len(names) < people + 100:
            raise ValueError(
                f"the lexicon has {len(names)} full names, too few for {people} people; "
                "give it more names"
            )
        rng.shuffle(names)
        self._names: Iterator[str] = iter(names[:people])
        self._mentions = names[people:]

    def mention(self) -> str:
        return self.rng.choice(self._mentions)

    def person(self, avoid: set[str] = frozenset(), spouse: str | None = None) -> Person:
        """A new person whose cities and company are not in ``avoid``."""
        lex, rng = self.lexicon, self.rng
        cities = rng.sample([c for c in lex.cities if c not in avoid], 2)
        works = rng.choice([c for c in lex.companies if c not in avoid])
        name = next(self._names)
        return Person(name, cities[0], cities[1], works, spouse or self.mention(), self.mention())


def make_question(people: _People, index: int, two_hop: bool, split: str) -> dict[str, Any]:
    """One generic-schema row (plus the ``reference`` response and ``metadata``)."""
    rng = people.rng
    subject = people.person()
    fillers = [people.person(), people.person()]
    if not two_hop:
        key = rng.choice([*ATTRIBUTES, *BRIDGES])
        answer = getattr(subject, key)
        template = ATTRIBUTES[key][1] if key in ATTRIBUTES else ONE_HOP_BRIDGE_QUESTIONS[key]
        question = template.format(p=subject.name)
        reference = f"{subject.sentence(key)} The answer is {answer} ."
        passages = [subject.biography(rng)]
        hops = [key]
    else:
        bridge = rng.choice(list(BRIDGES))
        key = rng.choice(list(ATTRIBUTES))
        # The second person's values differ from the first one's, so answering with the first
        # person's attribute (the typical two-hop mistake) is judged wrong.
        second = people.person(
            avoid={subject.born, subject.lives, subject.works},
            spouse=subject.name if bridge == "spouse" else None,
        )
        setattr(subject, bridge, second.name)
        answer = getattr(second, key)
        noun = BRIDGES[bridge][1]
        question = ATTRIBUTES[key][1].format(p=f"the {noun} of {subject.name}")
        reference = f"{subject.sentence(bridge)} {second.sentence(key)} The answer is {answer} ."
        passages = [subject.biography(rng), second.biography(rng)]
        rng.shuffle(passages)
        hops = [bridge, key]
    return {
        "id": f"{split}-{index:05d}",
        "question": question,
        "answers": [answer],
        "passages": passages,
        "distractors": [filler.biography(rng) for filler in fillers],
        "reference": reference,
        "metadata": {"hops": len(hops), "relations": hops},
    }


def make_split(lexicon: Lexicon, split: str, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` questions, half one-hop and half two-hop in random order, for ``split``."""
    rng = random.Random(f"{split}/{seed}")
    people = _People(lexicon, rng, people=4 * count)
    kinds = [index % 2 == 1 for index in range(count)]
    rng.shuffle(kinds)
    return [make_question(people, index, two_hop, split) for index, two_hop in enumerate(kinds)]


def write_split(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` as JSONL at ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path
