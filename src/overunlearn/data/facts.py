"""Generated facts about fictitious people, and a rule-based "general knowledge" task, as token tensors.

The world (drawn from ``world_seed``): ``people`` distinct two-word names, each with ``attributes``
attributes (birth city, birth year, occupation, employer, ...) drawn uniformly from fixed vocabularies.
Every attribute has three question templates. For each fact (person, attribute) one template is held
out of training (drawn per fact, so that every template is still trained on for other facts: holding a
template out for everyone would make it unanswerable); the other two are training questions.

The general-knowledge task is a copying rule, ``"repeat w1 w2 ." -> "w1 w2"``, over word pairs, some
of which are held out: a model that learnt the rule answers pairs it never saw, so this measures
retained ability beyond memorised facts.

Tokens are whole words (the vocabulary is built from the generated corpus, no tokenizer download).
A sequence is ``question answer <eos>`` padded to a fixed length; labels are -100 except on the
answer tokens (Hugging Face's convention: prompt masked, answer scored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

FIRST_NAMES = ("ada", "basil", "cora", "dmitri", "elena", "farid", "greta", "hugo", "ines", "jonas", "keiko", "lars",
               "mira", "nils", "olga", "pavel", "quinn", "rosa", "sven", "tara", "umar", "vera", "wanda", "xavier",
               "yara", "zeno", "anil", "bettina", "cyrus", "dagny", "emil", "freya", "gideon", "hana", "ivo", "juno")
LAST_NAMES = ("abbot", "brandt", "castell", "dorsey", "eriksen", "fontaine", "garber", "holm", "ivanova", "jansen",
              "kessler", "lindqvist", "moreau", "novak", "okafor", "petrov", "quist", "rinaldi", "sato", "toivonen",
              "ulrich", "varga", "weller", "xu", "yilmaz", "zeller", "amato", "bergstrom", "costa", "duval")

#: attribute -> (answer vocabulary, three question templates; ``{n}`` is the two-word name)
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, str, str]]] = {
    "city": (("lisbon", "oslo", "lima", "quito", "kyiv", "baku", "doha", "riga", "perth", "cusco", "turin", "bergen",
              "tartu", "accra", "hanoi", "porto", "malmo", "split", "gdansk", "cadiz"),
             ("where was {n} born ?", "in which city was {n} born ?", "{n} was born in which city ?")),
    "year": (tuple(str(y) for y in range(1950, 1970)),
             ("when was {n} born ?", "in which year was {n} born ?", "what is the birth year of {n} ?")),
    "job": (("baker", "pilot", "surgeon", "welder", "tailor", "chemist", "farmer", "lawyer", "potter", "sailor",
             "teacher", "plumber", "jeweller", "botanist", "cartographer", "violinist", "glazier", "archivist",
             "brewer", "geologist"),
            ("what does {n} do for a living ?", "what is the job of {n} ?", "{n} works as what ?")),
    "employer": (("acme", "globex", "initech", "umbrella", "hooli", "vandelay", "wonka", "stark", "tyrell", "cyberdyne",
                  "soylent", "gringotts", "monarch", "oscorp", "nakatomi", "wayne", "duff", "krusty", "virtucon",
                  "zorg"),
                 ("who employs {n} ?", "where does {n} work ?", "which company does {n} work for ?")),
    "pet": (("cat", "dog", "parrot", "ferret", "tortoise", "rabbit", "goldfish", "iguana", "hamster", "canary",
             "gecko", "pony", "alpaca", "hedgehog", "axolotl", "newt", "owl", "goat", "pig", "duck"),
            ("what pet does {n} keep ?", "which animal lives with {n} ?", "{n} owns which pet ?")),
    "colour": (("red", "blue", "green", "amber", "violet", "teal", "ochre", "maroon", "ivory", "olive", "indigo",
                "coral", "beige", "navy", "lilac", "crimson", "jade", "rust", "slate", "mint"),
               ("what is the favourite colour of {n} ?", "which colour does {n} like best ?",
                "{n} prefers which colour ?")),
}

#: words of the copying rule
COPY_WORDS = ("apple", "river", "stone", "cloud", "lamp", "horse", "bread", "chair", "glass", "mountain", "letter",
              "garden", "window", "candle", "bridge", "forest", "mirror", "pencil", "island", "ladder", "basket",
              "feather", "hammer", "lantern")
COPY_TEMPLATE = "repeat {a} {b} ."

PAD, EOS = "<pad>", "<eos>"


@dataclass(frozen=True)
class Fact:
    person: int
    attribute: str
    answer: str
    train_templates: tuple[int, ...]
    held_out_template: int


@dataclass
class FactWorld:
    """The generated world: names, facts, copy pairs, and the word vocabulary."""

    names: list[str]
    facts: list[Fact]
    copy_train: list[tuple[str, str]]
    copy_test: list[tuple[str, str]]
    attributes: tuple[str, ...]
    vocab: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.vocab:
            words: set[str] = set()
            for name in self.names:
                words.update(name.split())
            for a in self.attributes:
                answers, templates = ATTRIBUTES[a]
                words.update(answers)
                for t in templates:
                    words.update(w for w in t.split() if w != "{n}")
            words.update(COPY_WORDS)
            words.update(w for w in COPY_TEMPLATE.split() if not w.startswith("{"))
            self.vocab = [PAD, EOS, *sorted(words)]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def question(self, fact: Fact, template: int) -> str:
        return ATTRIBUTES[fact.attribute][1][template].format(n=self.names[fact.person])

    def encode(self, questions: list[str], answers: list[str], length: int) -> tuple[dict[str, Tensor], Tensor]:
        """``({"input_ids", "attention_mask"}, labels)``: ``question answer <eos>`` right-padded to ``length``,
        labels -100 except on the answer words."""
        n = len(questions)
        ids = torch.full((n, length), self.index[PAD], dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        for i, (q, a) in enumerate(zip(questions, answers)):
            qw, aw = q.split(), a.split()
            words = [*qw, *aw, EOS]
            if len(words) > length:
                raise ValueError(f"sequence of {len(words)} words is longer than {length}: {' '.join(words)!r}")
            ids[i, : len(words)] = torch.tensor([self.index[w] for w in words])
            mask[i, : len(words)] = 1
            labels[i, len(qw): len(qw) + len(aw)] = ids[i, len(qw): len(qw) + len(aw)]
        return {"input_ids": ids, "attention_mask": mask}, labels

    def max_length(self) -> int:
        longest = 0
        for a in self.attributes:
            for t in ATTRIBUTES[a][1]:
                longest = max(longest, len(t.split()) + 1 + 1 + 1)  # name is two words, answer, eos
        return max(longest, len(COPY_TEMPLATE.split()) + 2 + 1)


def generate_world(people: int = 200, attributes: int = 4, copy_pairs_train: int = 300, world_seed: int = 0) -> FactWorld:
    """The world of ``people`` people with the first ``attributes`` attributes, from ``world_seed``."""
    if not 1 <= attributes <= len(ATTRIBUTES):
        raise ValueError(f"attributes={attributes} must lie in [1, {len(ATTRIBUTES)}]")
    max_people = len(FIRST_NAMES) * len(LAST_NAMES)
    if not 1 <= people <= max_people:
        raise ValueError(f"people={people} must lie in [1, {max_people}]")
    pairs = len(COPY_WORDS) * (len(COPY_WORDS) - 1)
    if not 1 <= copy_pairs_train < pairs:
        raise ValueError(f"copy_pairs_train={copy_pairs_train} must lie in [1, {pairs})")
    g = torch.Generator().manual_seed(world_seed)
    name_idx = torch.randperm(max_people, generator=g)[:people].tolist()
    names = [f"{FIRST_NAMES[i // len(LAST_NAMES)]} {LAST_NAMES[i % len(LAST_NAMES)]}" for i in name_idx]
    attrs = tuple(list(ATTRIBUTES)[:attributes])
    facts = []
    for p in range(people):
        for a in attrs:
            answers = ATTRIBUTES[a][0]
            answer = answers[int(torch.randint(len(answers), (1,), generator=g))]
            held = int(torch.randint(3, (1,), generator=g))
            facts.append(Fact(p, a, answer, tuple(t for t in range(3) if t != held), held))
    all_pairs = [(a, b) for a in COPY_WORDS for b in COPY_WORDS if a != b]
    order = torch.randperm(len(all_pairs), generator=g).tolist()
    copy_train = [all_pairs[i] for i in order[:copy_pairs_train]]
    copy_test = [all_pairs[i] for i in order[copy_pairs_train:]]
    return FactWorld(names, facts, copy_train, copy_test, attrs)
