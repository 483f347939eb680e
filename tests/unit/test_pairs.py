"""Generated minimal pairs: BLiMP's schema, one-word differences, deterministic, loadable."""

from __future__ import annotations

import json

from rankscope.evaluate.blimp import load_pairs
from rankscope.evaluate.pairs import PARADIGMS, PEOPLE, generate_pairs, plural, verb, write_pairs

BLIMP_FIELDS = {"sentence_good": str, "sentence_bad": str, "field": str, "linguistics_term": str, "UID": str, "simple_LM_method": bool,
                "one_prefix_method": bool, "two_prefix_method": bool, "lexically_identical": bool, "pairID": str}


def test_generated_pairs_are_well_formed_minimal_and_distinct():
    pairs = generate_pairs(40)
    assert set(pairs) == set(PARADIGMS)
    terms = {rows[0]["linguistics_term"] for rows in pairs.values()}
    assert {"subject_verb_agreement", "determiner_noun_agreement", "anaphor_agreement", "irregular_forms", "argument_structure"} <= terms
    for uid, rows in pairs.items():
        assert len(rows) == 40 and uid.startswith("gen_")
        assert len({(r["sentence_good"], r["sentence_bad"]) for r in rows}) == 40
        for i, r in enumerate(rows):
            for key, tp in BLIMP_FIELDS.items():
                assert isinstance(r[key], tp), (uid, key)
            assert r["UID"] == uid and r["pairID"] == str(i)
            g, b = r["sentence_good"].split(), r["sentence_bad"].split()
            assert len(g) == len(b) and sum(x != y for x, y in zip(g, b)) == 1, r  # exactly one word differs
            assert r["sentence_good"][0].isupper() and r["sentence_good"].endswith(".")


def test_distractor_pairs_have_an_attractor_of_the_other_number():
    for r in generate_pairs(30)["gen_distractor_agreement_prepositional"]:
        words = r["sentence_good"].rstrip(".").split()
        head, attractor = words[1], words[-4]
        assert (head in PEOPLE) != (attractor in PEOPLE), r  # one singular, the other plural
        assert head in PEOPLE or head in {plural(p) for p in PEOPLE}


def test_generation_is_deterministic_and_prefix_stable():
    a, b = generate_pairs(25, seed=3), generate_pairs(25, seed=3)
    assert a == b
    assert generate_pairs(25, seed=4) != a
    longer = generate_pairs(60, seed=3)
    assert all(longer[u][:25] == a[u] for u in a)  # n pairs are the first n of a larger draw


def test_word_forms():
    assert [verb("break", "VBD"), verb("break", "VBN"), verb("like", "VBZ")] == ["broke", "broken", "likes"]
    assert plural("child") == "children" and plural("box") == "boxes"


def test_written_files_load_with_the_blimp_loader_and_cli(tmp_path):
    from rankscope.cli import main

    counts = write_pairs(tmp_path / "a", n_per_paradigm=10)
    assert set(counts.values()) == {10}
    pairs = load_pairs(tmp_path / "a")
    assert len(pairs) == 10 * len(PARADIGMS) and {p.uid for p in pairs} == set(PARADIGMS)
    assert main(["pairs", "-o", str(tmp_path / "b"), "-n", "10"]) == 0
    for f in (tmp_path / "a").glob("*.jsonl"):
        assert (tmp_path / "b" / f.name).read_text() == f.read_text()
        json.loads(f.read_text().splitlines()[0])
    assert len(load_pairs("builtin", max_pairs=10)) == len(pairs)


def test_every_paradigm_gives_the_default_200_or_a_clear_error(monkeypatch):
    import pytest

    from rankscope.core.errors import DataError
    from rankscope.evaluate import pairs as module

    assert {uid: len(rows) for uid, rows in generate_pairs().items()} == {uid: 200 for uid in PARADIGMS}
    def three(r):  # 3 distinct pairs only
        x = r.choice("abc")
        return f"The man saw {x}.", f"The man seen {x}."

    monkeypatch.setattr(module, "PARADIGMS", {"gen_tiny": ("syntax", "tiny", three, False)})
    with pytest.raises(DataError, match=r"gen_tiny: .* gave only 3 distinct pairs .* use -n 3 or fewer"):
        generate_pairs(5)
