"""Movie-review sentences with human sentiment ratings, for the sentiment task.

The data: 10,605 Rotten Tomatoes snippets (the Pang & Lee sentence polarity data), each rated by
human raters on a -4..+4 scale, from the ground truth of

    Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment
    Analysis of Social Media Text. Eighth International Conference on Weblogs and Social Media
    (ICWSM-14). Ann Arbor, MI, June 2014.

It ships in the vaderSentiment 3.3.2 source distribution (MIT licence), inside
``additional_resources/hutto_ICWSM_2014.tar.gz``; the wheel does not carry it. :func:`fetch`
downloads that sdist with pip (``pip download --no-binary :all: --no-deps vaderSentiment==3.3.2``),
checks it against PyPI's sha256 (a cached copy that does not match, e.g. one cut short, is
downloaded again) and extracts ``movieReviewSnippets_GroundTruth.txt`` with the dataset's README and the package's
licence into the data folder: ``$LORAMBO_DATA_DIR/vader`` (default ``~/.cache/lorambo/vader``).
It also extracts the NYT editorial and Amazon review snippets of the same archive, the planted
task's longer text (``snippet_text.py``). ``make data`` runs it;
``python -m lorambo.experiments.sentiment_data`` too. With a bundle active (``bundle.py``) the
loaders read the bundle's copy instead.

Labels: the sign of the mean valence (1 = positive); sentences with ``|valence| < min_abs`` (0.5
by default: 533 of them) are dropped as neither.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorambo.adapters.atomic import atomic_write
from lorambo.experiments import bundle

PACKAGE = "vaderSentiment==3.3.2"
# the raters' scale, "[-4] Extremely Negative" to "[4] Extremely Positive" (the dataset's README)
MIN_VALENCE, MAX_VALENCE = -4.0, 4.0
SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"  # PyPI's
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
DATA_FILE = "movieReviewSnippets_GroundTruth.txt"
SNIPPET_FILES = {"nytEditorialSnippets_GroundTruth.txt": 5190, "amazonReviewSnippets_GroundTruth.txt": 3708}
FILES = {f"hutto_ICWSM_2014/{name}": name for name in (DATA_FILE, *SNIPPET_FILES, "_README_.txt")}
LICENSE_FILE = "LICENSE_vaderSentiment.txt"
EXPECTED_ROWS = 10605


@dataclass(frozen=True)
class Sentence:
    text: str
    valence: float
    label: int


def data_dir() -> Path:
    root = os.environ.get("LORAMBO_DATA_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lorambo") / "vader"


def _extract(sdist: Path, target: Path) -> None:
    """The files of the inner archive named in FILES and the package licence, each written atomically."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as outer:
        licence = outer.extractfile("vaderSentiment-3.3.2/LICENSE.txt").read()
        inner_file = outer.extractfile(INNER)
        with tarfile.open(fileobj=inner_file, mode="r:gz") as inner:
            contents = {name: inner.extractfile(member).read() for member in inner.getmembers()
                        for name in [member.name] if name in FILES}
    missing = set(FILES) - set(contents)
    if missing:
        raise RuntimeError(f"sentiment data: {sorted(missing)} not found in {INNER} of {sdist}")
    contents = {FILES[k]: v for k, v in contents.items()}
    contents[LICENSE_FILE] = licence
    for name, data in sorted(contents.items(), key=lambda kv: kv[0] == DATA_FILE):  # data file last
        atomic_write(target / name, _bytes_writer(data))


def _bytes_writer(data: bytes):
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)

    return write


def _download(cache: Path, python: str) -> None:
    """``cache/SDIST`` from pip, renamed into place only once its sha256 is PyPI's: pip writes into
    a temporary folder, so a download cut short leaves nothing under the cached name."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=cache) as tmp:
        cmd = [python, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet", PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST
        if proc.returncode != 0 or not got.is_file():
            raise RuntimeError(f"sentiment data: `{' '.join(cmd)}` failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-500:]}")
        digest = bundle.sha256(got)
        if digest != SDIST_SHA256:
            raise RuntimeError(f"sentiment data: pip downloaded a {SDIST} with sha256 {digest}, expected "
                               f"{SDIST_SHA256} (PyPI's); nothing was kept")
        os.replace(got, cache / SDIST)


def fetch(target: Path | None = None, python: str = sys.executable) -> Path:
    """Download the sdist with pip (once) and extract the data; returns the data file's path.
    A folder missing any of the files is extracted again (from the cached sdist when it is
    intact; one whose sha256 is not PyPI's is downloaded again)."""
    target = Path(target) if target is not None else data_dir()
    path = target / DATA_FILE
    if all((target / name).is_file() for name in (*FILES.values(), LICENSE_FILE)):
        return path
    cached = target / "sdist" / SDIST
    if cached.is_file() and bundle.sha256(cached) != SDIST_SHA256:
        cached.unlink()  # cut short or altered: it would fail to extract on every call
    if not cached.is_file():
        _download(cached.parent, python)
    _extract(cached, target)
    return path


def main() -> int:
    """``make data``: fetch the data, print where it is; a failure is one line and exit status 1."""
    try:
        print(fetch())
    except (RuntimeError, OSError) as err:
        print(f"lorambo.experiments.sentiment_data: error: {err}", file=sys.stderr)
        return 1
    return 0


def data_path(name: str) -> Path:
    """Where a data file is read from: the active bundle (verified) or the data folder."""
    root = bundle.active()
    return bundle.data_file(root, name) if root is not None else data_dir() / name


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"sentiment data not found at {path}: run `make data` (or `python -m "
                                f"lorambo.experiments.sentiment_data`) to fetch it from the {PACKAGE} sdist, "
                                "or set LORAMBO_DATA_DIR to the folder that holds vader/")


def require(names) -> None:
    """FileNotFoundError saying to run ``make data`` unless every named data file is there (in the
    active bundle: verified), so that a run finds out before it starts, not in a worker minutes in."""
    for name in names:
        _require_file(data_path(name))


def read_rated(path: Path, expected_rows: int) -> list[tuple[str, float, str]]:
    """``(id, mean valence, text)`` of every line of a ``*_GroundTruth.txt`` file, in file order;
    a row count other than ``expected_rows`` means a partial file and is refused, and a valence
    that is not a finite number (nan, inf) or lies outside the raters' -4..+4 scale a damaged one:
    each is a ``ValueError`` naming the file, the line (and the value)."""
    _require_file(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}:{number}: expected 'id<TAB>valence<TAB>text', got {line[:80]!r}")
            try:
                valence = float(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{number}: valence {parts[1]!r} is not a number") from None
            if not math.isfinite(valence):  # nan would be dropped as "near zero" and inf labelled positive
                raise ValueError(f"{path}:{number}: valence {parts[1]!r} is not finite: a mean rating on the "
                                 "-4..+4 scale is a finite number")
            if not MIN_VALENCE <= valence <= MAX_VALENCE:  # a mean of ratings cannot leave their scale
                raise ValueError(f"{path}:{number}: valence {parts[1]!r} is outside the -4..+4 scale of the "
                                 "mean ratings (a damaged file)")
            rows.append((parts[0].strip(), valence, parts[2].strip()))
    if len(rows) != expected_rows:
        raise ValueError(f"{path}: {len(rows)} rated sentences, expected {expected_rows} (a partial download?)")
    return rows


def load_sentences(path: Path | None = None, min_abs: float = 0.5) -> list[Sentence]:
    """Every rated sentence with ``|valence| >= min_abs``, in file order, labelled by its sign."""
    rows = read_rated(Path(path) if path is not None else data_path(DATA_FILE), EXPECTED_ROWS)
    return [Sentence(text, v, int(v > 0)) for _, v, text in rows if abs(v) >= min_abs]


if __name__ == "__main__":
    sys.exit(main())
