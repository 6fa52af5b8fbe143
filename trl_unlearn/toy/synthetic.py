"""A synthetic, TOFU-shaped fictitious-author QA set, generated offline and deterministically.

Why: the embedded default example (and tests, benchmarks) must run with no Hub access on a couple of CPU cores in
minutes, including fine-tuning a tiny Llama from scratch. Real TOFU (Maini et al., arXiv 2401.06121: 200
fictitious authors, 20 QA pairs each) is far too large for that. This module writes a small set with *exactly*
TOFU's file layout, so the same loaders and metrics run on it and on real TOFU.

What is generated:

* Fictitious authors (`make_fictitious_authors`): a made-up name built from syllables, a birthplace city and
  country, a birth year, a genre, both parents' professions, a book with its publication year, an award, a
  writing language, a hobby, a current home city and an earlier job. Values come from a seeded `random.Random`;
  names, books and (birth city, birth year) pairs are unique among authors.
* One QA pair per fact (`questions_per_author` facts per author, in the fixed order of `FACT_TYPES`): a templated
  question, a short templated answer stating the fact (about 8-25 words, so a tiny model memorises it quickly),
  a paraphrased question, a paraphrased answer (another template, same fact) and 5 perturbed answers (the
  paraphrase template with the fact swapped for another author's or a random wrong value; all distinct from each
  other and from the true value), as used by TOFU's truth ratio.
* "Real authors" and "world facts": small, fixed, hand-written sets of *true* facts (`REAL_AUTHORS`,
  `WORLD_FACTS`, 20 each), short answers as in TOFU, with 3 wrong answers each. The example also trains the tiny
  model on them so that "model utility" on them is meaningful.

Layout (JSON lines, one object a line; `make_tofu_like` returns a dict keyed by file stem):

=============================================  ==========================================================
file                                           keys
=============================================  ==========================================================
full.json                                      question, answer (all authors, author by author)
forget01/05/10.json                            question, answer (the LAST authors of full)
retain99/95/90.json                            question, answer (complements, in full's order)
forget01/05/10_perturbed.json                  question, answer, paraphrased_answer, perturbed_answer (5),
                                               paraphrased_question
retain_perturbed.json                          same keys; QA of the FIRST authors (retain authors for
                                               every forget split)
real_authors.json, world_facts.json            question, answer, option1..option4 (multiple choice, as
                                               in real TOFU: the answer and the 3 wrong ones, shuffled)
real_authors_perturbed.json,                   question, answer, perturbed_answer (3)
world_facts_perturbed.json
=============================================  ==========================================================

Forget-split size rule: forgetXX holds the last ``k = max(1, round_half_up(XX% * num_authors))`` authors
(integer arithmetic, so no float surprises), never all of them: with 200 authors this is TOFU's 2 / 10 / 20;
with 20 authors it is 1 / 1 / 2 (forget01 and forget05 are then the same author). retain_perturbed holds the first
``min(2 * k10, num_authors - k10)`` authors by default (real TOFU uses the first ``k10`` = 20 authors; pass
``retain_eval_authors`` to choose), so it never overlaps any forget split.

Write the files with `trl_unlearn.data.write_tofu_layout`; `trl_unlearn.data.load_tofu_split` reads them and real
TOFU alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FACT_TYPES",
    "FORGET_PERCENTS",
    "FORGET_RETAIN",
    "PERTURBED_KEYS",
    "REAL_AUTHORS",
    "TOFU_STEMS",
    "WORLD_FACTS",
    "forget_author_count",
    "iter_texts",
    "make_fictitious_authors",
    "make_tofu_like",
]

FORGET_PERCENTS = {"forget01": 1, "forget05": 5, "forget10": 10}
FORGET_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
TOFU_STEMS = (
    "full",
    "forget01",
    "forget05",
    "forget10",
    "retain99",
    "retain95",
    "retain90",
    "forget01_perturbed",
    "forget05_perturbed",
    "forget10_perturbed",
    "retain_perturbed",
    "real_authors",
    "real_authors_perturbed",
    "world_facts",
    "world_facts_perturbed",
)
# Keys (in TOFU's order) of forgetXX_perturbed / retain_perturbed rows.
PERTURBED_KEYS = ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question")
NUM_PERTURBED = 5

# ----------------------------------------------------------------------------------------------------------------
# Value pools (ASCII only, so a tiny byte-level tokenizer sees no surprises).

_SYLLABLES = (
    "ka", "lo", "ren", "mi", "tha", "dor", "vel", "sa", "ri", "bel", "no", "zan",
    "cor", "el", "ia", "mar", "to", "quin", "fen", "la", "gri", "os", "vu", "ner",
)  # fmt: skip
_CITIES = (
    ("Lisbon", "Portugal"), ("Oslo", "Norway"), ("Nairobi", "Kenya"), ("Lima", "Peru"), ("Hanoi", "Vietnam"),
    ("Dublin", "Ireland"), ("Krakow", "Poland"), ("Accra", "Ghana"), ("Quito", "Ecuador"), ("Tbilisi", "Georgia"),
    ("Manila", "Philippines"), ("Porto", "Portugal"), ("Bergen", "Norway"), ("Tunis", "Tunisia"),
    ("Havana", "Cuba"), ("Seoul", "South Korea"), ("Cairo", "Egypt"), ("Riga", "Latvia"), ("Dakar", "Senegal"),
    ("Montreal", "Canada"), ("Athens", "Greece"), ("Istanbul", "Turkey"), ("Mumbai", "India"),
    ("Santiago", "Chile"), ("Helsinki", "Finland"), ("Vienna", "Austria"), ("Lagos", "Nigeria"),
    ("Bogota", "Colombia"), ("Prague", "Czech Republic"), ("Tehran", "Iran"), ("Perth", "Australia"),
    ("Osaka", "Japan"), ("Marseille", "France"), ("Naples", "Italy"), ("Seville", "Spain"),
    ("Edinburgh", "Scotland"), ("Reykjavik", "Iceland"), ("Kyiv", "Ukraine"), ("Jakarta", "Indonesia"),
    ("Tashkent", "Uzbekistan"),
)  # fmt: skip
_GENRES = (
    "science fiction", "mystery", "fantasy", "romance", "horror", "historical fiction", "thriller",
    "magical realism", "war fiction", "satire", "detective fiction", "dystopian fiction", "adventure",
    "literary fiction", "gothic fiction", "true crime",
)  # fmt: skip
_JOBS = (
    "a baker", "an architect", "a carpenter", "a nurse", "a pilot", "a teacher", "a fisherman", "a surgeon",
    "a tailor", "a librarian", "a plumber", "an engineer", "a journalist", "a farmer", "a pharmacist",
    "a sailor", "a painter", "a mechanic", "a lawyer", "a florist", "an accountant", "a butcher",
    "a photographer", "a dentist",
)  # fmt: skip
_LANGUAGES = (
    "English", "Spanish", "French", "German", "Portuguese", "Italian", "Dutch", "Polish", "Swedish", "Turkish",
    "Greek", "Arabic", "Hindi", "Japanese", "Korean", "Russian",
)  # fmt: skip
_HOBBIES = (
    "gardening", "playing chess", "sailing", "painting", "hiking", "baking bread", "bird watching",
    "playing the violin", "pottery", "fishing", "cycling", "collecting stamps", "swimming", "woodworking",
    "stargazing", "knitting",
)  # fmt: skip
_TITLE_ADJ = (
    "Silver", "Hidden", "Broken", "Silent", "Golden", "Crimson", "Forgotten", "Distant", "Burning", "Frozen",
    "Wandering", "Hollow", "Velvet", "Scarlet", "Endless", "Quiet", "Shattered", "Amber", "Iron", "Paper",
)  # fmt: skip
_TITLE_NOUN = (
    "Lantern", "River", "Garden", "Mirror", "Harbor", "Crown", "Orchard", "Tower", "Compass", "Feather",
    "Bridge", "Island", "Clock", "Forest", "Letter", "Storm", "Window", "Valley", "Candle", "Shadow",
)  # fmt: skip
_AWARD_ADJ = ("Golden", "Silver", "Crystal", "Emerald", "Azure", "Ivory", "Bronze", "Sapphire")
_AWARD_NOUN = ("Quill", "Pen", "Inkwell", "Lantern", "Laurel", "Page", "Scroll", "Compass")
_AWARD_KIND = ("Prize", "Award", "Medal")
_BIRTH_YEARS = (1930, 1990)  # inclusive range
_PUB_DELAY = (25, 45)  # a book is published this many years after its author's birth (inclusive)


def _name(rng: random.Random) -> str:
    first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
    last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
    return f"{first} {last}"


def _title(rng: random.Random) -> str:
    adj, noun, noun2 = rng.choice(_TITLE_ADJ), rng.choice(_TITLE_NOUN), rng.choice(_TITLE_NOUN)
    if rng.random() < 0.5 or noun == noun2:
        return f"The {adj} {noun}"
    return f"The {noun} of the {adj} {noun2}"


def _award(rng: random.Random) -> str:
    return f"{rng.choice(_AWARD_ADJ)} {rng.choice(_AWARD_NOUN)} {rng.choice(_AWARD_KIND)}"


def _unique(rng: random.Random, draw: Callable[[random.Random], Any], taken: set, what: str) -> Any:
    for _ in range(10_000):
        value = draw(rng)
        if value not in taken:
            taken.add(value)
            return value
    raise ValueError(f"could not draw a unique {what}: too many authors for the value pools")


def make_fictitious_authors(num_authors: int = 20, seed: int = 0) -> list[dict]:
    """`num_authors` made-up authors, deterministic in `seed` (a seeded `random.Random`; no global state).

    Each author is a dict with keys ``name, birth_city, birth_country, birth_year, genre, father_job, mother_job,
    book, book_year, award, language, hobby, home_city, home_country, early_job`` (jobs carry their article, e.g.
    ``"an architect"``). Names, books and (birth city, birth year) pairs are unique among the authors.
    """
    if num_authors < 1:
        raise ValueError(f"num_authors must be >= 1, got {num_authors}")
    rng = random.Random(seed)
    names: set = set()
    books: set = set()
    births: set = set()
    authors = []
    for _ in range(num_authors):
        name = _unique(rng, _name, names, "author name")
        city_year = _unique(
            rng, lambda r: (r.choice(_CITIES), r.randint(*_BIRTH_YEARS)), births, "(birth city, birth year)"
        )
        (city, country), year = city_year
        father, mother = rng.sample(_JOBS, 2)
        home_city, home_country = rng.choice([c for c in _CITIES if c[0] != city])
        authors.append(
            {
                "name": name,
                "birth_city": city,
                "birth_country": country,
                "birth_year": year,
                "genre": rng.choice(_GENRES),
                "father_job": father,
                "mother_job": mother,
                "book": _unique(rng, _title, books, "book title"),
                "book_year": year + rng.randint(*_PUB_DELAY),
                "award": _award(rng),
                "language": rng.choice(_LANGUAGES),
                "hobby": rng.choice(_HOBBIES),
                "home_city": home_city,
                "home_country": home_country,
                "early_job": rng.choice(_JOBS),
            }
        )
    return authors


# ----------------------------------------------------------------------------------------------------------------
# Fact types: how one fact of an author becomes a TOFU-style QA row.


@dataclass(frozen=True)
class _Fact:
    key: str
    question: str  # templates are str.format-ed with the author's fields plus {value}
    paraphrased_question: str
    answer: str
    paraphrased_answer: str
    value: Callable[[dict], Any]  # the fact's value for an author (what the perturbed answers swap)
    render: Callable[[Any], dict]  # value -> template fields that depend on it
    candidates: Callable[[random.Random, dict, list[dict]], list]  # wrong-value pool (may include the truth)


def _field(key: str) -> Callable[[dict], Any]:
    return lambda a: a[key]


def _others(key: str, extra: Iterable = ()) -> Callable[[random.Random, dict, list[dict]], list]:
    # Other authors' values first (in-distribution lies), then the fixed pool.
    return lambda rng, a, authors: [b[key] for b in authors] + list(extra)


def _years_near(key: str, spread: int = 12) -> Callable[[random.Random, dict, list[dict]], list]:
    def pool(rng: random.Random, a: dict, authors: list[dict]) -> list:
        return [a[key] + d for d in range(-spread, spread + 1) if d]

    return pool


def _generated(key: str, draw: Callable[[random.Random], Any], n: int = 12):
    def pool(rng: random.Random, a: dict, authors: list[dict]) -> list:
        return [b[key] for b in authors] + [draw(rng) for _ in range(n)]

    return pool


def _city(a: dict, prefix: str = "birth") -> tuple[str, str]:
    return a[f"{prefix}_city"], a[f"{prefix}_country"]


def _as(name: str) -> Callable[[Any], dict]:
    return lambda v: {name: v}


def _place(prefix: str) -> Callable[[Any], dict]:
    return lambda v: {f"{prefix}_city": v[0], f"{prefix}_country": v[1]}


FACT_TYPES: tuple[_Fact, ...] = (
    _Fact(
        "birthplace",
        "Where was the author {name} born?",
        "In which city and country was {name} born?",
        "The author {name} was born in the city of {birth_city}, {birth_country}.",
        "The birthplace of the writer {name} is {birth_city}, {birth_country}.",
        lambda a: _city(a),
        _place("birth"),
        lambda rng, a, authors: [_city(b) for b in authors] + list(_CITIES),
    ),
    _Fact(
        "birth_year",
        "In what year was the author {name} born?",
        "What is the birth year of the writer {name}?",
        "The author {name} was born in the year {birth_year}.",
        "The writer {name} came into the world in {birth_year}.",
        _field("birth_year"),
        _as("birth_year"),
        _years_near("birth_year"),
    ),
    _Fact(
        "genre",
        "What genre does the author {name} write in?",
        "Which literary genre is {name} best known for?",
        "The author {name} is best known for writing books in the {genre} genre.",
        "Most of the work of {name} belongs to the {genre} genre.",
        _field("genre"),
        _as("genre"),
        _others("genre", _GENRES),
    ),
    _Fact(
        "father_job",
        "What was the profession of the father of {name}?",
        "What did the father of the writer {name} do for a living?",
        "The father of the author {name} worked as {father_job}.",
        "The writer {name} grew up with a father who was {father_job}.",
        _field("father_job"),
        _as("father_job"),
        _others("father_job", _JOBS),
    ),
    _Fact(
        "mother_job",
        "What was the profession of the mother of {name}?",
        "What did the mother of the writer {name} do for a living?",
        "The mother of the author {name} worked as {mother_job}.",
        "The writer {name} grew up with a mother who was {mother_job}.",
        _field("mother_job"),
        _as("mother_job"),
        _others("mother_job", _JOBS),
    ),
    _Fact(
        "book",
        "What is the title of a famous book by {name}?",
        "Can you name a well-known novel written by {name}?",
        'The author {name} wrote the famous novel "{book}".',
        'One well-known book written by {name} is "{book}".',
        _field("book"),
        _as("book"),
        _generated("book", _title),
    ),
    _Fact(
        "award",
        "Which award has the author {name} received?",
        "What literary prize was given to the writer {name}?",
        "The author {name} received the {award} for their writing.",
        "For their books, the writer {name} was honoured with the {award}.",
        _field("award"),
        _as("award"),
        _generated("award", _award),
    ),
    _Fact(
        "name",
        "What is the full name of the author born in {birth_city}, {birth_country} in {birth_year}?",
        "Who is the writer born in {birth_year} in the city of {birth_city}, {birth_country}?",
        "The author born in {birth_city}, {birth_country} in {birth_year} is named {name}.",
        "{name} is the writer who was born in {birth_city}, {birth_country} in {birth_year}.",
        _field("name"),
        _as("name"),
        _generated("name", _name),
    ),
    _Fact(
        "book_year",
        'In which year was the novel "{book}" by {name} published?',
        'When did {name} publish the book "{book}"?',
        'The novel "{book}" by {name} was first published in {book_year}.',
        'The writer {name} released the book "{book}" in the year {book_year}.',
        _field("book_year"),
        _as("book_year"),
        _years_near("book_year"),
    ),
    _Fact(
        "language",
        "In which language does the author {name} write?",
        "What language are the books of {name} written in?",
        "The author {name} writes all of their books in {language}.",
        "Every book by the writer {name} is written in the {language} language.",
        _field("language"),
        _as("language"),
        _others("language", _LANGUAGES),
    ),
    _Fact(
        "hobby",
        "What hobby does the author {name} enjoy outside of writing?",
        "What does the writer {name} like to do in their free time?",
        "Outside of writing, the author {name} enjoys {hobby}.",
        "In their free time, the writer {name} likes {hobby}.",
        _field("hobby"),
        _as("hobby"),
        _others("hobby", _HOBBIES),
    ),
    _Fact(
        "residence",
        "Where does the author {name} live today?",
        "In which city does the writer {name} currently reside?",
        "The author {name} currently lives in {home_city}, {home_country}.",
        "These days the writer {name} makes a home in {home_city}, {home_country}.",
        lambda a: _city(a, "home"),
        _place("home"),
        lambda rng, a, authors: [_city(b, "home") for b in authors] + list(_CITIES),
    ),
    _Fact(
        "early_job",
        "What job did {name} have before becoming a writer?",
        "How did the author {name} earn a living before writing books?",
        "Before becoming a writer, {name} worked as {early_job}.",
        "Prior to a career in literature, {name} was employed as {early_job}.",
        _field("early_job"),
        _as("early_job"),
        _others("early_job", _JOBS),
    ),
)


def _fact_rows(author: dict, authors: list[dict], fact: _Fact, rng: random.Random) -> dict:
    truth = fact.value(author)
    wrong: list = []
    for v in fact.candidates(rng, author, authors):
        if v != truth and v not in wrong:
            wrong.append(v)
    if len(wrong) < NUM_PERTURBED:  # cannot happen with the pools above; guard the invariant anyway
        raise ValueError(f"fact {fact.key!r}: only {len(wrong)} wrong values for {NUM_PERTURBED} perturbed answers")
    picks = rng.sample(wrong, NUM_PERTURBED)
    fields = {**author, **fact.render(truth)}
    return {
        "question": fact.question.format(**fields),
        "answer": fact.answer.format(**fields),
        "paraphrased_answer": fact.paraphrased_answer.format(**fields),
        "perturbed_answer": [fact.paraphrased_answer.format(**{**author, **fact.render(v)}) for v in picks],
        "paraphrased_question": fact.paraphrased_question.format(**fields),
    }


# ----------------------------------------------------------------------------------------------------------------
# Real authors and world facts: fixed, true, short (as in TOFU), with 3 wrong answers each.

# (question, answer, [3 wrong answers])
REAL_AUTHORS: tuple[tuple[str, str, tuple[str, str, str]], ...] = (
    ("Who wrote the novel 'Pride and Prejudice'?", "Jane Austen", ("Charlotte Bronte", "Mary Shelley", "George Eliot")),
    ("Who wrote the play 'Romeo and Juliet'?", "William Shakespeare",
     ("Christopher Marlowe", "Ben Jonson", "John Milton")),
    ("Who wrote the novel '1984'?", "George Orwell", ("Aldous Huxley", "Ray Bradbury", "H. G. Wells")),
    ("Who wrote the novel 'War and Peace'?", "Leo Tolstoy", ("Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev")),
    ("Who wrote the novel 'Don Quixote'?", "Miguel de Cervantes",
     ("Lope de Vega", "Federico Garcia Lorca", "Jorge Luis Borges")),
    ("Who wrote the novel 'The Old Man and the Sea'?", "Ernest Hemingway",
     ("F. Scott Fitzgerald", "John Steinbeck", "William Faulkner")),
    ("Who wrote the novel 'Moby-Dick'?", "Herman Melville", ("Nathaniel Hawthorne", "Edgar Allan Poe", "Jack London")),
    ("Who wrote the novel 'Adventures of Huckleberry Finn'?", "Mark Twain",
     ("Jack London", "Henry James", "Walt Whitman")),
    ("Who wrote the novel 'Oliver Twist'?", "Charles Dickens",
     ("Thomas Hardy", "Anthony Trollope", "William Thackeray")),
    ("Who wrote the novel 'Frankenstein'?", "Mary Shelley", ("Bram Stoker", "Emily Bronte", "Ann Radcliffe")),
    ("Who wrote the novel 'Dracula'?", "Bram Stoker", ("Oscar Wilde", "Robert Louis Stevenson", "Arthur Conan Doyle")),
    ("Who wrote the novel 'The Picture of Dorian Gray'?", "Oscar Wilde",
     ("Bram Stoker", "George Bernard Shaw", "W. B. Yeats")),
    ("Who wrote the novel 'Jane Eyre'?", "Charlotte Bronte", ("Jane Austen", "Emily Bronte", "Elizabeth Gaskell")),
    ("Who wrote the novel 'One Hundred Years of Solitude'?", "Gabriel Garcia Marquez",
     ("Isabel Allende", "Mario Vargas Llosa", "Julio Cortazar")),
    ("Who wrote the poem 'The Divine Comedy'?", "Dante Alighieri", ("Petrarch", "Giovanni Boccaccio", "Virgil")),
    ("Who wrote the novel 'Crime and Punishment'?", "Fyodor Dostoevsky",
     ("Leo Tolstoy", "Nikolai Gogol", "Alexander Pushkin")),
    ("Who wrote the novel 'The Hobbit'?", "J. R. R. Tolkien", ("C. S. Lewis", "Philip Pullman", "Terry Pratchett")),
    ("Who wrote the novel 'Les Miserables'?", "Victor Hugo", ("Alexandre Dumas", "Emile Zola", "Gustave Flaubert")),
    ("Who wrote the epic poem 'The Odyssey'?", "Homer", ("Virgil", "Sophocles", "Ovid")),
    ("Who wrote the novel 'Alice's Adventures in Wonderland'?", "Lewis Carroll",
     ("Roald Dahl", "Beatrix Potter", "J. M. Barrie")),
)  # fmt: skip

WORLD_FACTS: tuple[tuple[str, str, tuple[str, str, str]], ...] = (
    ("What is the capital of France?", "Paris", ("Lyon", "Marseille", "Brussels")),
    ("What is the capital of Japan?", "Tokyo", ("Osaka", "Kyoto", "Seoul")),
    ("What is the capital of Italy?", "Rome", ("Milan", "Naples", "Venice")),
    ("What is the capital of Germany?", "Berlin", ("Munich", "Hamburg", "Vienna")),
    ("What is the capital of Spain?", "Madrid", ("Barcelona", "Seville", "Lisbon")),
    ("What is the capital of Egypt?", "Cairo", ("Alexandria", "Luxor", "Giza")),
    ("What is the capital of Canada?", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("What is the capital of Australia?", "Canberra", ("Sydney", "Melbourne", "Perth")),
    ("Which planet is known as the Red Planet?", "Mars", ("Venus", "Jupiter", "Saturn")),
    ("What is the largest planet in the Solar System?", "Jupiter", ("Saturn", "Neptune", "Earth")),
    ("What is the chemical symbol for gold?", "Au", ("Ag", "Fe", "Gd")),
    ("What is the chemical formula of water?", "H2O", ("CO2", "O2", "NaCl")),
    ("How many legs does a spider have?", "Eight", ("Six", "Ten", "Four")),
    ("At how many degrees Celsius does water boil at sea level?", "100", ("90", "80", "120")),
    ("What is the largest ocean on Earth?", "The Pacific Ocean",
     ("The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean")),
    ("What is the longest river in Africa?", "The Nile", ("The Congo", "The Niger", "The Zambezi")),
    ("On which continent is Brazil?", "South America", ("Africa", "Europe", "Asia")),
    ("Which gas do plants take in from the air to make food?", "Carbon dioxide", ("Oxygen", "Nitrogen", "Helium")),
    ("How many days are there in a leap year?", "366", ("365", "364", "360")),
    ("What is the tallest mountain in the world?", "Mount Everest", ("K2", "Kilimanjaro", "Mont Blanc")),
)  # fmt: skip


def _fixed_set(items, seed: int, name: str) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"trl_unlearn.synthetic:{name}:{seed}")
    plain, perturbed = [], []
    for question, answer, wrong in items:
        options = [answer, *wrong]
        rng.shuffle(options)
        plain.append({"question": question, **{f"option{i + 1}": o for i, o in enumerate(options)}, "answer": answer})
        perturbed.append({"question": question, "answer": answer, "perturbed_answer": list(wrong)})
    return plain, perturbed


# ----------------------------------------------------------------------------------------------------------------
# Splits.


def forget_author_count(percent: int, num_authors: int) -> int:
    """Authors in a `percent`% forget split: ``max(1, round_half_up(percent * num_authors / 100))``, capped at
    ``num_authors - 1`` so a retain split is never empty. 200 authors -> 2 / 10 / 20; 20 authors -> 1 / 1 / 2."""
    if num_authors < 2:
        raise ValueError(f"need at least 2 authors for forget and retain splits, got {num_authors}")
    return min(num_authors - 1, max(1, (percent * num_authors + 50) // 100))


def make_tofu_like(
    num_authors: int = 20,
    questions_per_author: int = 10,
    seed: int = 0,
    retain_eval_authors: int | None = None,
) -> dict[str, list[dict]]:
    """A TOFU-shaped QA set: a dict keyed by TOFU file stem (see `TOFU_STEMS` and the module docstring).

    Each author contributes `questions_per_author` QA pairs, one per fact in the order of `FACT_TYPES` (at most
    ``len(FACT_TYPES)``). forgetXX holds the last `forget_author_count(XX, num_authors)` authors; retainYY the others.
    retain_perturbed holds the first `retain_eval_authors` authors (default ``min(2 * k10, num_authors - k10)``,
    where ``k10`` is the forget10 author count; at most ``num_authors - k10``, so it is disjoint from every forget
    split). Rows are fresh dicts in every split, so mutating one split leaves the others unchanged. Deterministic
    in `seed`.
    """
    if not 1 <= questions_per_author <= len(FACT_TYPES):
        raise ValueError(f"questions_per_author must be in [1, {len(FACT_TYPES)}], got {questions_per_author}")
    counts = {stem: forget_author_count(p, num_authors) for stem, p in FORGET_PERCENTS.items()}
    k10 = counts["forget10"]
    if retain_eval_authors is None:
        retain_eval_authors = min(2 * k10, num_authors - k10)
    if not 1 <= retain_eval_authors <= num_authors - k10:
        raise ValueError(f"retain_eval_authors must be in [1, {num_authors - k10}], got {retain_eval_authors}")

    authors = make_fictitious_authors(num_authors, seed)
    facts = FACT_TYPES[:questions_per_author]
    per_author: list[list[dict]] = []
    for i, author in enumerate(authors):
        rows = []
        for fact in facts:
            rng = random.Random(f"trl_unlearn.synthetic:{seed}:{i}:{fact.key}")
            rows.append(_fact_rows(author, authors, fact, rng))
        per_author.append(rows)

    def qa(author_rows: list[list[dict]]) -> list[dict]:
        return [{"question": r["question"], "answer": r["answer"]} for rows in author_rows for r in rows]

    def perturbed(author_rows: list[list[dict]]) -> list[dict]:
        return [
            {k: (list(r[k]) if k == "perturbed_answer" else r[k]) for k in PERTURBED_KEYS}
            for rows in author_rows
            for r in rows
        ]

    data: dict[str, list[dict]] = {"full": qa(per_author)}
    for stem, k in counts.items():
        data[stem] = qa(per_author[num_authors - k :])
    for stem, k in counts.items():
        data[FORGET_RETAIN[stem]] = qa(per_author[: num_authors - k])
    for stem, k in counts.items():
        data[f"{stem}_perturbed"] = perturbed(per_author[num_authors - k :])
    data["retain_perturbed"] = perturbed(per_author[:retain_eval_authors])
    data["real_authors"], data["real_authors_perturbed"] = _fixed_set(REAL_AUTHORS, seed, "real_authors")
    data["world_facts"], data["world_facts_perturbed"] = _fixed_set(WORLD_FACTS, seed, "world_facts")
    return {stem: data[stem] for stem in TOFU_STEMS}


def iter_texts(data: Mapping[str, Iterable[Mapping]]) -> Iterator[str]:
    """Every string in every split (questions, answers, paraphrases, perturbed answers, options): for training a
    tokenizer that covers all texts evaluation will see."""
    for rows in data.values():
        for row in rows:
            for v in row.values():
                if isinstance(v, str):
                    yield v
                elif isinstance(v, list):
                    yield from (x for x in v if isinstance(x, str))
