"""Build vitatlas' default concept vocabulary from WordNet 3.0 (run once; the output is committed).

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn
    python scripts/build_vocabulary.py /tmp/wn/usr/share/wordnet src/vitatlas/interpret/data/vocabulary.txt

What it keeps (WordNet's own classification, nothing hand-picked per word):
- nouns from the lexicographer files that name things one can see: animals, artifacts, body parts,
  foods, natural objects, people, plants, shapes, substances, natural phenomena and a few places/acts;
- adjectives whose head synset is an *attribute* value (WordNet's ``=`` pointer) of a visual attribute
  noun (colour, shape, size, texture, brightness, ...), with their satellites;
- ranked by the SemCor sense-tag counts in ``cntlist.rev`` (how often the word is used in that sense),
  keeping lemmas of one or two words, lowercase letters only, that WordNet writes in lower case (no
  proper names, no abbreviations).

The WordNet licence asks that its notice travel with every copy: it is written at the top of the file.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

NOUN_FILES = {  # lexicographer file number -> (name, how many lemmas to keep at most)
    5: ("noun.animal", 500), 6: ("noun.artifact", 1500), 8: ("noun.body", 200), 13: ("noun.food", 350),
    17: ("noun.object", 300), 18: ("noun.person", 150), 19: ("noun.phenomenon", 80), 20: ("noun.plant", 250),
    25: ("noun.shape", 80), 27: ("noun.substance", 200), 15: ("noun.location", 80), 4: ("noun.act", 80),
}
VISUAL_ATTRIBUTES = {"color", "colour", "size", "shape", "form", "texture", "brightness", "lightness", "age",
                     "wetness", "dryness", "cleanness", "cleanliness", "length", "width", "height", "thickness",
                     "weight", "temperature", "smoothness", "roughness", "hardness", "softness", "transparency",
                     "pattern", "straightness", "curliness", "fullness", "emptiness", "beauty", "speed"}
MAX_ADJECTIVES = 300
LEMMA = re.compile(r"^[a-z]+( [a-z]+)?$")

NOTICE = """\
# vitatlas default concept vocabulary: visual nouns and attributes from WordNet 3.0 (one phrase a line;
# lines starting with # are comments). Built by scripts/build_vocabulary.py from Debian's wordnet-base.
#
# WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.
#
# THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR
# WARRANTIES, EXPRESS OR IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO
# REPRESENTATIONS OR WARRANTIES OF MERCHANTABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
# OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
# COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.
#
# The name of Princeton University or Princeton may not be used in advertising or publicity pertaining
# to distribution of the software and/or database.  Title to copyright in this software, database and
# any associated documentation shall at all times remain with Princeton University and LICENSEE agrees
# to preserve same.  (Full licence: LICENSE-WORDNET next to this file.)
"""


def tag_counts(wn: Path) -> dict[tuple[str, int, int], int]:
    """(lemma, synset type, lexicographer file) -> summed SemCor tag count."""
    counts: dict[tuple[str, int, int], int] = defaultdict(int)
    for line in (wn / "cntlist.rev").read_text().splitlines():
        key, _, count = line.split()
        lemma, rest = key.split("%")
        ss_type, lex_file = int(rest.split(":")[0]), int(rest.split(":")[1])
        counts[lemma, ss_type, lex_file] += int(count)
    return counts


def parse_data(path: Path) -> dict[str, dict]:
    """synset offset -> {"type", "lex_file", "lemmas", "pointers": [(symbol, offset, pos)]}."""
    synsets = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue  # licence header
        fields = line.split(" | ")[0].split()
        offset, lex_file, ss_type, n_words = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]) for i in range(n_words)]
        at = 4 + 2 * n_words
        n_ptr = int(fields[at])
        pointers = [(fields[at + 1 + 4 * j], fields[at + 2 + 4 * j], fields[at + 3 + 4 * j]) for j in range(n_ptr)]
        synsets[offset] = {"type": ss_type, "lex_file": lex_file, "lemmas": lemmas, "pointers": pointers}
    return synsets


def nouns(wn: Path, counts) -> list[str]:
    # cntlist.rev lowercases every lemma; data.noun keeps the case, which tells proper names apart
    common = {lemma for syn in parse_data(wn / "data.noun").values() for lemma in syn["lemmas"] if lemma.islower()}
    best: dict[int, dict[str, int]] = defaultdict(dict)
    for (lemma, ss_type, lex_file), count in counts.items():
        if ss_type == 1 and lex_file in NOUN_FILES and lemma in common:
            phrase = lemma.replace("_", " ")
            if LEMMA.match(phrase):
                best[lex_file][phrase] = best[lex_file].get(phrase, 0) + count
    out = []
    for lex_file, (_, cap) in sorted(NOUN_FILES.items()):
        ranked = sorted(best[lex_file].items(), key=lambda kv: (-kv[1], kv[0]))
        out += [phrase for phrase, _ in ranked[:cap]]
    return out


def adjectives(wn: Path, counts) -> list[str]:
    noun_synsets = parse_data(wn / "data.noun")
    adj_synsets = parse_data(wn / "data.adj")
    wanted = set()
    for offset, syn in adj_synsets.items():
        if syn["type"] != "a":
            continue
        attrs = {lemma.lower() for sym, off, pos in syn["pointers"] if sym == "=" and pos == "n"
                 for lemma in noun_synsets[off]["lemmas"]}
        if attrs & VISUAL_ATTRIBUTES:
            wanted.add(offset)
            wanted.update(off for sym, off, pos in syn["pointers"] if sym == "&")
    score: dict[str, int] = {}
    for offset in wanted:
        for lemma in adj_synsets[offset]["lemmas"]:
            phrase = lemma.replace("_", " ")
            if LEMMA.match(phrase):
                score[phrase] = max(score.get(phrase, 0), counts.get((lemma, 3, 0), 0) + counts.get((lemma, 5, 0), 0))
    ranked = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))
    return [phrase for phrase, _ in ranked[:MAX_ADJECTIVES]]


def main(wn_dir: str, out: str) -> None:
    wn = Path(wn_dir)
    counts = tag_counts(wn)
    phrases = list(dict.fromkeys(nouns(wn, counts) + adjectives(wn, counts)))
    Path(out).write_text(NOTICE + "\n".join(phrases) + "\n")
    print(f"wrote {len(phrases)} phrases to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: build_vocabulary.py WORDNET_DICT_DIR OUT.txt")
    main(*sys.argv[1:])
