"""Generated minimal pairs in the BLiMP jsonl format: a SUBSTITUTE for BLiMP, not BLiMP.

Used where the real files (../shared/data/blimp) are absent, e.g. `eval.blimp_dir=builtin`.
Each paradigm fills one template from a small built-in lexicon; word forms come from lemminflect
(verbs) and inflect (noun plurals). The pair differs in one place, as in BLiMP (Warstadt et al.
2020, §2), covering five of its phenomena: subject-verb agreement (with and without a distractor
noun of the other number), determiner-noun agreement, anaphor agreement, irregular forms and
argument structure. Generation is deterministic: each paradigm draws from `random.Random(seed)`
combined with its own index, and duplicate pairs are dropped. UIDs start with `gen_` so results
are never mistaken for BLiMP's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import inflect
from lemminflect import getInflection

from rankscope.core.errors import DataError

MALE = ["man", "boy", "king", "father", "brother", "son", "uncle", "husband"]
FEMALE = ["woman", "girl", "queen", "mother", "sister", "daughter", "aunt", "wife"]
MALE_NAMES = ["John", "David", "Michael", "Robert", "James", "Thomas", "Peter", "Paul"]
FEMALE_NAMES = ["Mary", "Susan", "Lisa", "Anna", "Sarah", "Emily", "Laura", "Rachel"]
PEOPLE = ["teacher", "doctor", "student", "child", "actor", "waiter", "dancer", "customer", "author", "pilot", "guest", "driver"]
THINGS = ["book", "car", "cake", "window", "door", "painting", "letter", "chair", "picture", "song", "box", "glass", "dish", "key", "table", "bottle"]
ADJECTIVES = ["red", "old", "small", "new", "heavy", "broken", "green", "cheap"]
PLACES_PREP = ["near", "behind", "beside", "with", "next to"]
TRANSITIVE = ["like", "see", "find", "want", "buy", "bring", "carry", "notice", "sell", "clean", "describe", "fix"]
INTRANSITIVE = ["arrive", "sleep", "laugh", "smile", "sneeze", "cry", "yawn", "die", "frown", "wait"]
REFLEXIVE_VERBS = ["hurt", "see", "help", "like", "praise", "blame", "criticize", "admire", "watch", "trust"]
IRREGULAR = ["break", "write", "eat", "take", "drive", "see", "forget", "hide", "steal", "choose", "wear", "throw", "draw", "give", "begin", "sing", "drink", "ride"]
IRREGULAR_OBJECTS = {"break": THINGS, "write": ["letter", "song", "book", "poem", "story"], "eat": ["cake", "apple", "sandwich", "pie", "soup"],
                     "take": THINGS, "drive": ["car", "truck", "bus", "van"], "see": THINGS, "forget": ["key", "letter", "song", "book", "name"],
                     "hide": THINGS, "steal": THINGS, "choose": THINGS, "wear": ["hat", "coat", "dress", "scarf", "ring"], "throw": ["ball", "box", "key", "bottle"],
                     "draw": ["picture", "map", "circle", "horse"], "give": ["book", "cake", "letter", "key"], "begin": ["song", "story", "game", "lesson"],
                     "sing": ["song", "hymn", "ballad"], "drink": ["water", "milk", "tea", "coffee"], "ride": ["horse", "bike", "bus", "train"]}
DETS_SG, DETS_PL = ["this", "that"], ["these", "those"]

_engine = inflect.engine()


def plural(noun: str) -> str:
    return _engine.plural_noun(noun)


def verb(lemma: str, tag: str) -> str:
    """lemminflect form; tags VBZ (3sg present), VBP (plural present), VBD (past), VBN (participle)."""
    return getInflection(lemma, tag)[0]


def sentence(*words: str) -> str:
    text = " ".join(w for w in words if w)
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------- paradigms: rng -> (good, bad)
def sva_simple(r: random.Random) -> tuple[str, str]:
    noun, v, obj = r.choice(PEOPLE), r.choice(TRANSITIVE), r.choice(THINGS)
    if r.random() < 0.5:  # singular subject
        return sentence("the", noun, verb(v, "VBZ"), "the", obj), sentence("the", noun, verb(v, "VBP"), "the", obj)
    return sentence("the", plural(noun), verb(v, "VBP"), "the", obj), sentence("the", plural(noun), verb(v, "VBZ"), "the", obj)


def sva_distractor(r: random.Random) -> tuple[str, str]:
    """The head noun and the attractor in the prepositional phrase differ in number."""
    noun, prep, v, obj = r.choice(PEOPLE), r.choice(PLACES_PREP), r.choice(TRANSITIVE), r.choice(THINGS)
    other = r.choice([p for p in PEOPLE if p != noun])
    if r.random() < 0.5:
        subj = ["the", noun, prep, "the", plural(other)]
        return sentence(*subj, verb(v, "VBZ"), "the", obj), sentence(*subj, verb(v, "VBP"), "the", obj)
    subj = ["the", plural(noun), prep, "the", other]
    return sentence(*subj, verb(v, "VBP"), "the", obj), sentence(*subj, verb(v, "VBZ"), "the", obj)


def sva_be(r: random.Random) -> tuple[str, str]:
    noun, adj = r.choice(THINGS), r.choice(ADJECTIVES)
    if r.random() < 0.5:
        return sentence("the", noun, "is", adj), sentence("the", noun, "are", adj)
    return sentence("the", plural(noun), "are", adj), sentence("the", plural(noun), "is", adj)


def det_noun(r: random.Random, with_adjective: bool = False) -> tuple[str, str]:
    name, v, noun = r.choice(MALE_NAMES + FEMALE_NAMES), r.choice(TRANSITIVE), r.choice(THINGS)
    adj = r.choice(ADJECTIVES) if with_adjective else ""
    if r.random() < 0.5:
        det = r.choice(DETS_SG)
        return sentence(name, verb(v, "VBD"), det, adj, noun), sentence(name, verb(v, "VBD"), det, adj, plural(noun))
    det = r.choice(DETS_PL)
    return sentence(name, verb(v, "VBD"), det, adj, plural(noun)), sentence(name, verb(v, "VBD"), det, adj, noun)


def anaphor_gender(r: random.Random) -> tuple[str, str]:
    v = verb(r.choice(REFLEXIVE_VERBS), "VBD")
    if r.random() < 0.5:
        subj = r.choice(MALE_NAMES + [f"the {n}" for n in MALE])
        return sentence(subj, v, "himself"), sentence(subj, v, "herself")
    subj = r.choice(FEMALE_NAMES + [f"the {n}" for n in FEMALE])
    return sentence(subj, v, "herself"), sentence(subj, v, "himself")


def anaphor_number(r: random.Random) -> tuple[str, str]:
    v = verb(r.choice(REFLEXIVE_VERBS), "VBD")
    male = r.random() < 0.5
    own = "himself" if male else "herself"
    if r.random() < 0.5:
        subj = "the " + r.choice(MALE if male else FEMALE)
        return sentence(subj, v, own), sentence(subj, v, "themselves")
    subj = "the " + plural(r.choice(MALE if male else FEMALE))
    return sentence(subj, v, "themselves"), sentence(subj, v, own)


def irregular_past(r: random.Random) -> tuple[str, str]:
    """Simple past (good) vs past participle (bad) in a past-tense main clause."""
    name, lemma = r.choice(MALE_NAMES + FEMALE_NAMES), r.choice(IRREGULAR)
    obj = r.choice(IRREGULAR_OBJECTS[lemma])
    return sentence(name, verb(lemma, "VBD"), "the", obj), sentence(name, verb(lemma, "VBN"), "the", obj)


def irregular_participle(r: random.Random) -> tuple[str, str]:
    """Passive participle (good) vs simple past (bad), with an agent: the bare `the X was V-ed` has
    only ~150 distinct sentences in this lexicon, fewer than the default 200 pairs."""
    lemma, agent = r.choice(IRREGULAR), r.choice(PEOPLE)
    obj = r.choice(IRREGULAR_OBJECTS[lemma])
    return (sentence("the", obj, "was", verb(lemma, "VBN"), "by the", agent),
            sentence("the", obj, "was", verb(lemma, "VBD"), "by the", agent))


def transitive(r: random.Random) -> tuple[str, str]:
    """A transitive verb takes the object (good); an intransitive one cannot (bad)."""
    noun, obj = r.choice(PEOPLE), r.choice(THINGS)
    return sentence("the", noun, verb(r.choice(TRANSITIVE), "VBD"), "the", obj), sentence("the", noun, verb(r.choice(INTRANSITIVE), "VBD"), "the", obj)


def intransitive(r: random.Random) -> tuple[str, str]:
    """Without an object, an intransitive verb is fine (good) and a transitive one is not (bad)."""
    noun = r.choice(PEOPLE)
    return sentence("the", noun, verb(r.choice(INTRANSITIVE), "VBD")), sentence("the", noun, verb(r.choice(TRANSITIVE), "VBD"))


def passive(r: random.Random) -> tuple[str, str]:
    obj, noun = r.choice(THINGS), r.choice(PEOPLE)
    return (sentence("the", obj, "was", verb(r.choice(TRANSITIVE), "VBN"), "by the", noun),
            sentence("the", obj, "was", verb(r.choice(INTRANSITIVE), "VBN"), "by the", noun))


# UID -> (field, phenomenon (BLiMP linguistics_term), generator, lexically identical)
PARADIGMS: dict[str, tuple[str, str, Callable[[random.Random], tuple[str, str]], bool]] = {
    "gen_regular_subject_verb_agreement": ("morphology", "subject_verb_agreement", sva_simple, False),
    "gen_distractor_agreement_prepositional": ("morphology", "subject_verb_agreement", sva_distractor, False),
    "gen_be_agreement": ("morphology", "subject_verb_agreement", sva_be, False),
    "gen_determiner_noun_agreement": ("morphology", "determiner_noun_agreement", det_noun, False),
    "gen_determiner_noun_agreement_with_adjective": ("morphology", "determiner_noun_agreement", lambda r: det_noun(r, True), False),
    "gen_anaphor_gender_agreement": ("morphology", "anaphor_agreement", anaphor_gender, False),
    "gen_anaphor_number_agreement": ("morphology", "anaphor_agreement", anaphor_number, False),
    "gen_irregular_past_verbs": ("morphology", "irregular_forms", irregular_past, False),
    "gen_irregular_past_participle_verbs": ("morphology", "irregular_forms", irregular_participle, False),
    "gen_transitive": ("syntax", "argument_structure", transitive, False),
    "gen_intransitive": ("syntax", "argument_structure", intransitive, False),
    "gen_passive": ("syntax", "argument_structure", passive, False),
}


def generate_pairs(n_per_paradigm: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """UID -> exactly `n_per_paradigm` distinct rows in BLiMP's jsonl schema; a DataError naming the
    paradigm and the most it can give when its lexicon runs out of distinct pairs."""
    if n_per_paradigm < 1:
        raise DataError(f"pairs per paradigm must be at least 1, not {n_per_paradigm}")
    out = {}
    for k, (uid, (field, term, gen, identical)) in enumerate(PARADIGMS.items()):
        r = random.Random(seed * 1_000_003 + k)
        seen: set[tuple[str, str]] = set()
        rows: list[dict] = []
        for _ in range(50 * n_per_paradigm):
            if len(rows) >= n_per_paradigm:
                break
            good, bad = gen(r)
            if good == bad or (good, bad) in seen:
                continue
            seen.add((good, bad))
            rows.append({"sentence_good": good, "sentence_bad": bad, "field": field, "linguistics_term": term, "UID": uid,
                         "simple_LM_method": True, "one_prefix_method": False, "two_prefix_method": False,
                         "lexically_identical": identical, "pairID": str(len(rows)), "source": "rankscope generated (not BLiMP)"})
        if len(rows) < n_per_paradigm:
            raise DataError(f"paradigm {uid}: the built-in lexicon gave only {len(rows)} distinct pairs in {50 * n_per_paradigm:,} draws, "
                            f"fewer than the {n_per_paradigm} asked for; use -n {len(rows)} or fewer")
        out[uid] = rows
    return out


def write_pairs(folder: str | Path, n_per_paradigm: int = 200, seed: int = 0) -> dict[str, int]:
    """Write `<UID>.jsonl` files into `folder`; returns pairs per UID."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for uid, rows in generate_pairs(n_per_paradigm, seed).items():
        (folder / f"{uid}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        counts[uid] = len(rows)
    return counts
