"""Longer real English text for the planted task: NYT editorials and Amazon product reviews.

Both come with the movie-review sentences of the sentiment task, in the ground truth of Hutto &
Gilbert (ICWSM 2014) inside the vaderSentiment 3.3.2 sdist (``sentiment_data.py`` extracts them,
``make data``): 5,190 snippets of 498 NYT editorials and 3,708 of 300 Amazon reviews, one
sentence or two per line, id ``<document>_<snippet>``. The snippets of a document, joined in file
order, give its text back: 798 documents of a few hundred tokens, so at 64 tokens per window the
planted task's splits hold 1,929 / 440 / 374 windows (train / validation / test) where the
standard-library docstrings (``text_corpus.py``) leave 53 / 13 / 7. Only the texts are used,
never the ratings; the movie reviews (the sentiment task's data) are not part of this text.
"""

from __future__ import annotations

from lorambo.experiments.sentiment_data import SNIPPET_FILES, data_path, read_rated


def snippet_documents() -> list[str]:
    """Every NYT editorial, then every Amazon review, each its snippets joined by spaces, in file order."""
    documents = []
    for name, rows in SNIPPET_FILES.items():
        texts: dict[str, list[str]] = {}
        for ident, _, text in read_rated(data_path(name), rows):
            if text:
                texts.setdefault(ident.split("_")[0], []).append(text)
        documents += [" ".join(parts) for parts in texts.values()]
    return documents
