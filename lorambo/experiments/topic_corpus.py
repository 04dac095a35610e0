"""A real labeled text dataset that ships offline: the English ChatterBot corpus.

The PyPI package ``chatterbot-corpus`` (by Gunther Cox and contributors; licence: BSD per its PyPI classifier
"License :: OSI Approved :: BSD License"; the wheel ships no LICENSE file)
holds user-contributed dialogues as YAML files, one file per topic
(``chatterbot_corpus/data/english/<topic>.yml``). Every utterance is labeled with the topic of
its file: a topic-classification task on real English sentences. Nothing is downloaded at run time.

Cleaning, fixed for reproducibility: utterances are whitespace-normalised; an utterance that
occurs under two topics is dropped (its label would be ambiguous); repeats within a topic are
kept once. Topics with too few distinct utterances are left out (``tech_support`` repeats 20
sentences 2,100 times). Splits are by conversation, so the lines of one dialogue never straddle
train and test.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

# Topics with >= 45 distinct utterances in chatterbot-corpus 1.3.3 (after the cleaning above).
TOPICS = ("ai", "coding", "computers", "conversations", "emotion", "literature", "money", "movies",
          "psychology", "science", "sports", "trivia")
PACKAGE = "chatterbot-corpus==1.3.3"


@dataclass(frozen=True)
class Utterance:
    text: str
    label: int
    group: str  # "<topic>/<conversation index>": the unit of the train/val/test split


def corpus_dir() -> Path:
    """``chatterbot_corpus/data/english`` inside the installed package, or a clear ImportError."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the topic task reads the English ChatterBot corpus from the PyPI package "
                          f"'chatterbot-corpus'; pip install {PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    if not path.is_dir():
        raise FileNotFoundError(f"chatterbot-corpus is installed but has no {path}")
    return path


def _read_topic(path: Path) -> list[tuple[str, str]]:
    try:
        import yaml
    except ImportError as err:  # pyyaml comes with transformers; say so if it is gone
        raise ImportError("reading chatterbot-corpus needs pyyaml: pip install pyyaml") from err
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out = []
    for i, conversation in enumerate(doc.get("conversations") or []):
        for line in conversation or []:
            if isinstance(line, str) and line.strip():
                out.append((" ".join(line.split()), f"{path.stem}/{i}"))
    return out


def load_utterances(topics: tuple[str, ...] = TOPICS, cap: int | None = None, seed: int = 0
                    ) -> tuple[list[Utterance], list[str]]:
    """(utterances, topic names); label i is ``topics[i]``. ``cap``: at most that many per topic
    (whole conversations, picked with ``seed``)."""
    root = corpus_dir()
    raw = {}
    for topic in topics:
        path = root / f"{topic}.yml"
        if not path.is_file():
            raise FileNotFoundError(f"chatterbot-corpus has no topic {topic!r} ({path})")
        raw[topic] = _read_topic(path)
    owners: dict[str, set[str]] = {}
    for topic, lines in raw.items():
        for text, _ in lines:
            owners.setdefault(text, set()).add(topic)
    rng = random.Random(seed)
    out = []
    for label, topic in enumerate(topics):
        seen, rows = set(), []
        for text, group in raw[topic]:
            if len(owners[text]) == 1 and text not in seen:
                seen.add(text)
                rows.append(Utterance(text, label, group))
        if cap is not None and len(rows) > cap:
            groups = sorted({u.group for u in rows})
            rng.shuffle(groups)
            kept, count = set(), 0
            for g in groups:
                if count >= cap:
                    break
                kept.add(g)
                count += sum(u.group == g for u in rows)
            rows = [u for u in rows if u.group in kept][:cap]
        if not rows:
            raise RuntimeError(f"topic {topic!r} has no usable utterance")
        out.extend(rows)
    return out, list(topics)


def split_by_group(rows: list[Utterance], fractions=(0.6, 0.2, 0.2), seed: int = 0
                   ) -> tuple[list[Utterance], list[Utterance], list[Utterance]]:
    """Train / validation / test, per topic by conversation, about ``fractions`` of the utterances."""
    rng = random.Random(seed)
    splits = ([], [], [])
    for label in sorted({u.label for u in rows}):
        mine = [u for u in rows if u.label == label]
        groups = sorted({u.group for u in mine})
        rng.shuffle(groups)
        sizes = {g: sum(u.group == g for u in mine) for g in groups}
        done, bounds = 0, (fractions[0] * len(mine), (fractions[0] + fractions[1]) * len(mine))
        where = {}
        for g in groups:
            where[g] = 0 if done < bounds[0] else (1 if done < bounds[1] else 2)
            done += sizes[g]
        if not any(v == 2 for v in where.values()) and len(groups) >= 3:
            where[groups[-1]] = 2  # every topic appears in the test set
        for u in mine:
            splits[where[u.group]].append(u)
    return splits
