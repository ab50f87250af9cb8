"""Small seeded datasets the tests write themselves: nothing is read from outside the repository.

- `captions`: English -> German image captions built from a phrase grammar (a Multi30k look-alike:
  short sentences, shared words, a real if simple translation task);
- `dialogues`: two-person dialogues and a one-sentence summary (a DialogSum look-alike);
- `write_jsonl`: the records as a JSON Lines file, the format the recipes read.

The same ``seed`` always gives the same records, on any machine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (English, German) phrase pairs; a caption is subject + verb + object + place.
_SUBJECTS = [
    ("a man", "ein mann"), ("a woman", "eine frau"), ("a young boy", "ein kleiner junge"),
    ("a little girl", "ein kleines mädchen"), ("an old man", "ein alter mann"),
    ("a child", "ein kind"), ("a black dog", "ein schwarzer hund"),
    ("a brown dog", "ein brauner hund"), ("a young woman", "eine junge frau"),
    ("a person", "eine person"), ("a worker", "ein arbeiter"), ("a musician", "ein musiker"),
]
_VERBS = [
    ("is holding", "hält"), ("is looking at", "schaut auf"), ("is carrying", "trägt"),
    ("is playing with", "spielt mit"), ("is throwing", "wirft"), ("is pushing", "schiebt"),
    ("is painting", "malt"), ("is cleaning", "putzt"),
]
_OBJECTS = [
    ("a red ball", "einen roten ball"), ("a blue bike", "ein blaues fahrrad"),
    ("a large box", "eine große kiste"), ("a white hat", "einen weißen hut"),
    ("a small boat", "ein kleines boot"), ("a green bag", "eine grüne tasche"),
    ("a wooden chair", "einen holzstuhl"), ("a yellow kite", "einen gelben drachen"),
    ("a guitar", "eine gitarre"), ("a camera", "eine kamera"),
]
_PLACES = [
    ("in the park", "im park"), ("on the beach", "am strand"), ("in the snow", "im schnee"),
    ("on a busy street", "auf einer belebten straße"), ("near a building", "neben einem gebäude"),
    ("in the water", "im wasser"), ("at night", "in der nacht"), ("", ""),
]


def _sentence(words: str) -> str:
    return words[0].upper() + words[1:] + " ."


def captions(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct English -> German caption pairs ({"id", "source", "target"})."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    while len(records) < n:
        parts = [rng.choice(table) for table in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES)]
        english = " ".join(en for en, _ in parts if en)
        if english in seen:
            continue
        seen.add(english)
        german = " ".join(de for _, de in parts if de)
        records.append({"id": f"caption-{len(records)}", "source": _sentence(english),
                        "target": _sentence(german)})
    return records


_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack"]
_ERRANDS = [
    ("the bank", "open an account"), ("the station", "buy a ticket"),
    ("the library", "return some books"), ("the market", "buy vegetables"),
    ("the dentist", "have a check-up"), ("the post office", "send a parcel"),
    ("the gym", "meet a trainer"), ("the bakery", "order a cake"),
]
_TIMES = ["this morning", "after lunch", "at five", "tomorrow", "on Friday", "tonight"]


def dialogues(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` short dialogues between #Person1# and #Person2#, each with a one-sentence summary."""
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    for i in range(n):
        name = rng.choice(_NAMES)
        place, errand = rng.choice(_ERRANDS)
        when = rng.choice(_TIMES)
        company = rng.random() < 0.5
        lines = [
            f"#Person1#: Hi {name}, where are you going {when}?",
            f"#Person2#: I'm going to {place}. I need to {errand}.",
            "#Person1#: " + ("Can I come with you? I have nothing to do."
                             if company else "Good luck. I have to stay at home."),
            "#Person2#: " + ("Sure, let's go together." if company else "Thanks, see you later."),
        ]
        summary = (f"{name} is going to {place} {when} to {errand}"
                   + (" and #Person1# goes along." if company else "."))
        records.append({"id": f"dialogue-{i}", "source": "\n".join(lines), "target": summary})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write ``records`` as UTF-8 JSON Lines to ``path`` (parents created) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def tokenizer_corpus(path: Path) -> Path:
    """A text file to train small SentencePiece / BPE tokenizers on (a vocabulary of a few
    hundred pieces needs more distinct words than the grammars above have): the captions and
    dialogues, then the prose of this repository's own docs (docs/*.md)."""
    lines = [r[k] for r in captions(400) + dialogues(200) for k in ("source", "target")]
    for page in sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md")):
        lines += [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    return path


def text_lines(n: int, seed: int = 0) -> str:
    """``n`` lines of English text (the English side of `captions`), one per line: raw text for
    a small character-level language model."""
    return "".join(record["source"] + "\n" for record in captions(n, seed))
