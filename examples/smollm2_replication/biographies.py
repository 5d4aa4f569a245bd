"""One-hop biography questions in natural English, in the generic input schema of ``solopo-data``.

Every passage is the biography of one person, titled with the person's name, five facts in
random order, each in one of a few phrasings::

    Emma Clarke
    Emma Clarke works for Northfield Bank. Emma Clarke was born in Harrogate. Emma Clarke is
    married to Daniel Hughes. Emma Clarke was trained by Sarah Whitfield. Emma Clarke lives in
    Dunmore.

A question asks for one fact of one person (``Where was Emma Clarke born?``); its relevant
passage is that biography. In a long context ``build-contexts`` buries it among other people's
biographies, which have the same five facts in the same style: the model must find the right
person by name, and its typical mistake is a fluent answer read from a look-alike. One-hop only:
SmolLM2-135M-Instruct answers two-hop questions on 36% of short prompts and 0% at 1,024 tokens
(measured), too little to learn from.

Names, towns and companies are ordinary English ones from fixed lists; the facts are drawn afresh
for every person, so a model's prior knowledge cannot answer, only reading can.

Splits are disjoint in people: the grid of full names is shuffled once (fixed seed) and cut into
one block per split (:data:`SPLIT_BLOCKS`), so no person, with a biography or only mentioned as a
spouse or mentor, appears in two splits. Within a split every full name is used once for a
biography, and spouses and mentors are named from the split's mention names, which never have a
biography: no two passages contradict each other, and the pool of distractors that
``build-contexts`` draws from (every passage of the file) never holds a second biography of a
question's person.

Each row also carries ``distractor_count`` other biographies in ``distractors``: they enlarge the
pool so that contexts of a few thousand tokens can be filled from a hundred questions.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIRST_NAMES = """
Aaron Abigail Adam Adrian Alan Albert Alice Amelia Amy Andrew Angela Anna Anthony Arthur Barbara
Benjamin Bernard Beth Brian Bridget Caroline Carl Catherine Charles Charlotte Christine Claire
Colin Daniel David Deborah Dennis Diana Donald Dorothy Douglas Edward Eleanor Elizabeth Ellen
Emily Emma Eric Esther Evelyn Frank Fiona Frederick Gavin George Gerald Grace Graham Hannah
Harold Harriet Helen Henry Hugh Ian Irene Isaac Jack Jacob James Jane Janet Jason Jennifer Jessica
Joan John Jonathan Joseph Joyce Julia Karen Katherine Keith Kenneth Laura Lawrence Leonard Lily
Linda Louise Lucy Margaret Maria Martin Mary Matthew Michael Miriam Nancy Natalie Neil Nicholas
Norman Oliver Pamela Patrick Paul Peter Philip Rachel Raymond Rebecca Richard Robert Roger Rose
Ruth Samuel Sandra Sarah Simon Sophie Stephen Susan Teresa Thomas Timothy Victoria Walter William
""".split()

LAST_NAMES = """
Abbott Adams Allen Archer Atkinson Bailey Baker Barker Barnes Bennett Bishop Blake Booth Bradley
Brooks Burton Butler Campbell Carter Chambers Chapman Clarke Cole Collins Cooper Cox Crawford
Davies Dawson Dixon Doyle Duncan Edwards Elliott Ellis Evans Fisher Fleming Fletcher Forbes
Foster Fowler Fraser Gardner Gibson Gilbert Gordon Graves Gray Hall Hamilton Hancock Harding
Harper Harris Hart Hayes Henderson Hill Holland Holmes Howard Hudson Hughes Hunt Jenkins Johnson
Kelly Kennedy Knight Lambert Lawson Lloyd Marsh Marshall Mason Matthews Mills Mitchell Moore
Morgan Morris Murphy Murray Nelson Newman Norris Owen Palmer Parker Patel Pearson Perry Porter
Powell Price Quinn Reed Reynolds Richards Robinson Rogers Russell Ryan Saunders Scott Shaw
Simpson Spencer Stevens Stone Sullivan Taylor Thompson Turner Wallace Walsh Ward Watson Webb
Wells West Wheeler Whitfield Wilkinson Willis Wood Wright Young
""".split()

TOWNS = """
Aldbury Ashford Avonmore Bakewell Barnstaple Belford Bexley Bramley Brixham Buxton Calder
Carlisle Chesham Clifton Corbridge Cromer Dalton Dorking Dunmore Durham Easton Ely Fairford
Falmouth Frome Glenrock Grantham Harrogate Hexham Holbrook Hythe Keswick Kendal Kingsbridge
Lanark Ledbury Lewes Linton Ludlow Malden Marlow Melrose Morpeth Newbury Oakham Penrith Redhill
Ripon Rothbury Rye Salcombe Selby Sherborne Skipton Stamford Thirsk Tiverton Truro Wareham
Whitby Windermere Yarmouth
""".split()

COMPANIES = tuple(
    """
Northfield Bank|Harbour Logistics|Brightwater Foods|Redstone Energy|Silverline Insurance
Oakwood Publishing|Bluebell Textiles|Greenway Transport|Highland Pharmacy|Lakeside Hotels
Meridian Software|Pinecrest Builders|Riverside Dairy|Summit Engineering|Westbrook Motors
Crown Ceramics|Kestrel Airlines|Ironbridge Steel|Foxglove Gardens|Merton Furniture
Beacon Media|Copperfield Mining|Driftwood Boats|Evergreen Paper|Falcon Security
Granite Telecom|Hawthorn Bakery|Juniper Chemicals|Lighthouse Shipping|Maple Electronics
Nettle Clothing|Orchard Cider|Primrose Cosmetics|Quarry Stoneworks|Rosewood Pianos
Saltmarsh Fisheries|Thistle Brewing|Willow Toys|Yewtree Surveyors|Ashgrove Dental
""".replace("\n", "|")
    .strip("|")
    .split("|")
)

#: The five facts: key -> (sentence phrasings, question). ``{p}`` is the person, ``{v}`` the value.
FACTS: dict[str, tuple[tuple[str, ...], str]] = {
    "born": (
        ("{p} was born in {v}.", "{p} was born in the town of {v}.", "{p} comes from {v}."),
        "Where was {p} born?",
    ),
    "lives": (
        ("{p} lives in {v}.", "{p} now lives in {v}.", "These days {p} lives in {v}."),
        "Where does {p} live?",
    ),
    "works": (
        ("{p} works for {v}.", "{p} is employed by {v}.", "{p} has a job at {v}."),
        "Which company does {p} work for?",
    ),
    "spouse": (
        ("{p} is married to {v}.", "{p} married {v}.", "The spouse of {p} is {v}."),
        "Who is {p} married to?",
    ),
    "mentor": (
        ("{p} was trained by {v}.", "{p} learned the trade from {v}.", "The mentor of {p} is {v}."),
        "Who trained {p}?",
    ),
}

#: Each split's share of the shuffled name grid: (first, last) fractions. The rest is unused.
SPLIT_BLOCKS: dict[str, tuple[float, float]] = {
    "train": (0.0, 0.5),
    "dev": (0.5, 0.7),
    "test": (0.7, 0.95),
    "pilot": (0.95, 1.0),
}
#: Of a split's block, the share kept for people who are only mentioned (spouses, mentors).
MENTION_SHARE = 0.25
NAME_GRID_SEED = "names/v1"


def name_block(split: str) -> list[str]:
    """The full names of ``split``: its slice of the name grid shuffled with a fixed seed."""
    if split not in SPLIT_BLOCKS:
        raise ValueError(f"split: expected one of {', '.join(SPLIT_BLOCKS)}, got {split!r}")
    names = [f"{first} {last}" for first, last in itertools.product(FIRST_NAMES, LAST_NAMES)]
    random.Random(NAME_GRID_SEED).shuffle(names)
    low, high = SPLIT_BLOCKS[split]
    return names[int(low * len(names)) : int(high * len(names))]


@dataclass
class Person:
    """One person with a biography: a full name and the five facts."""

    name: str
    facts: dict[str, str]

    def biography(self, rng: random.Random) -> dict[str, str]:
        """The person's passage, ``{"title", "text"}``: each fact in a random phrasing, in
        random order."""
        sentences = [
            rng.choice(FACTS[key][0]).format(p=self.name, v=v) for key, v in self.facts.items()
        ]
        rng.shuffle(sentences)
        return {"title": self.name, "text": " ".join(sentences)}


class _People:
    """Draws the people of one split: each biography gets a name of its own; spouses and
    mentors are named from the split's mention names (with repetition), never a biography's."""

    def __init__(self, split: str, people: int, rng: random.Random) -> None:
        block = name_block(split)
        mentions = int(MENTION_SHARE * len(block))
        if len(block) - mentions < people:
            raise ValueError(
                f"split {split!r} has {len(block) - mentions} names for biographies, "
                f"{people} needed; ask for fewer questions"
            )
        self.rng = rng
        self._mentions = block[:mentions]
        names = block[mentions:]
        rng.shuffle(names)
        self._names = iter(names)

    def person(self) -> Person:
        rng = self.rng
        born, lives = rng.sample(TOWNS, 2)
        spouse, mentor = rng.sample(self._mentions, 2)
        facts = {
            "born": born,
            "lives": lives,
            "works": rng.choice(COMPANIES),
            "spouse": spouse,
            "mentor": mentor,
        }
        return Person(next(self._names), facts)


def make_split(
    split: str, count: int, *, seed: int = 0, distractor_count: int = 3
) -> list[dict[str, Any]]:
    """``count`` one-hop questions of ``split`` in the generic schema.

    Each row: ``id``, ``question``, ``answers`` (one), ``passages`` (the subject's biography),
    ``distractors`` (``distractor_count`` other people's biographies), ``metadata`` (``fact``:
    which of the five facts is asked). The asked facts are balanced: each of the five is asked
    of ``count / 5`` questions (rounded), in random order.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    rng = random.Random(f"{split}/{seed}")
    people = _People(split, count * (1 + distractor_count), rng)
    keys = [list(FACTS)[index % len(FACTS)] for index in range(count)]
    rng.shuffle(keys)
    rows = []
    for index, key in enumerate(keys):
        subject = people.person()
        fillers = [people.person() for _ in range(distractor_count)]
        rows.append(
            {
                "id": f"{split}-{index:05d}",
                "question": FACTS[key][1].format(p=subject.name),
                "answers": [subject.facts[key]],
                "passages": [subject.biography(rng)],
                "distractors": [filler.biography(rng) for filler in fillers],
                "metadata": {"fact": key},
            }
        )
    return rows


def write_split(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` as JSONL at ``path`` (parents created, through a temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    partial.replace(path)
    return path
