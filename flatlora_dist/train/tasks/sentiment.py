"""Built-in task ``sentiment``: human-scored sentences from the VADER paper (Hutto & Gilbert 2014).

The data ships inside the sdist of ``vaderSentiment==3.3.2`` (``additional_resources/
hutto_ICWSM_2014.tar.gz``): 10,605 movie-review sentences, 4,200 tweets, 3,708 Amazon review and
5,190 NYT editorial snippets, each with the mean of ~20 human ratings in [-4, 4].
:func:`ensure_vader_data` gets it into ``<cache root>/data/vader`` (run it at install time; see the
Makefile) so that runs need no network.

Labels: positive if the mean rating > 0, negative if < 0; exactly 0 is dropped.  Movie sentences are
split train / validation / test by a fixed permutation (independent of the run seed); Amazon, tweets
and NYT are out-of-domain test sets.
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from random import Random

from ..cache import cache_root
from ..data import DataError, Example, prompt_response_example

VADER_VERSION = "3.3.2"
SDIST_NAME = f"vaderSentiment-{VADER_VERSION}.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_TARBALL = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
DATA_DIRNAME = "hutto_ICWSM_2014"
OFFLINE_ENV = "FLATLORA_OFFLINE"
INSTALL_HINT = (
    'python -c "from flatlora_dist.train.tasks.sentiment import ensure_vader_data; ensure_vader_data()"'
)
SOURCES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
OOD_SPLITS = ("amazon", "tweets", "nyt")
SPLITS = ("train", "validation", "test", *OOD_SPLITS)
SPLIT_SEED = 20140601
MOVIE_TEST, MOVIE_VALIDATION = 2000, 500
LABELS = ("negative", "positive")
PLAIN_PROMPT = "Review: {text}\nSentiment:"
CHAT_PROMPT = "Review: {text}\nIs the sentiment of this review positive or negative? Answer with one word."


@dataclass(frozen=True)
class Rated:
    """One human-rated text: source set, id, mean rating, label (sign of the rating)."""

    source: str
    id: str
    score: float
    text: str

    @property
    def label(self) -> str:
        return label_for(self.score)


def label_for(score: float) -> str | None:
    """``positive`` if ``score > 0``, ``negative`` if ``< 0``, None (dropped) if exactly 0."""
    if score > 0:
        return "positive"
    if score < 0:
        return "negative"
    return None


# ------------------------------------------------------------------------------------------ files


def vader_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the sdist and the extracted files live (default ``<cache root>/data/vader``)."""
    return Path(cache_dir) if cache_dir is not None else cache_root() / "data" / "vader"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in SOURCES.values())


def _download_sdist(root: Path) -> Path:
    """``pip download`` the sdist into ``root`` (the package registry is the only network used)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", f"vaderSentiment=={VADER_VERSION}", "-d", str(root)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    sdist = root / SDIST_NAME
    if result.returncode != 0 or not sdist.is_file():
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"sentiment data: pip download of vaderSentiment=={VADER_VERSION} failed: {last[0]}")
    return sdist


def _check_sha(sdist: Path) -> None:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise DataError(f"{sdist}: sha256 {digest} does not match the pinned vaderSentiment {VADER_VERSION} sdist")


def _extract(sdist: Path, target: Path) -> None:
    """Extract the inner tarball's text files (flat, names only) into ``target`` atomically."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(INNER_TARBALL).read()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            for member in inner.getmembers():
                name = Path(member.name).name
                if member.isfile() and name.endswith(".txt") and not name.startswith("."):
                    (tmp / name).write_bytes(inner.extractfile(member).read())
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_vader_data(cache_dir: str | os.PathLike | None = None, allow_download: bool | None = None) -> Path:
    """Folder with the VADER ground-truth files: the extracted copy, else the cached sdist, else pip.

    ``allow_download`` defaults to true unless ``$FLATLORA_OFFLINE`` is set.  Safe under concurrent
    callers (file lock; extraction into a temporary folder, then rename).
    """
    from filelock import FileLock

    root = vader_cache_dir(cache_dir)
    target = root / DATA_DIRNAME
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    if allow_download is None:
        allow_download = not os.environ.get(OFFLINE_ENV)
    with FileLock(str(root / ".lock"), timeout=600):
        if _complete(target):
            return target
        sdist = root / SDIST_NAME
        if not sdist.is_file():
            if not allow_download:
                raise DataError(f"sentiment data missing in {root} and downloads are off; run: {INSTALL_HINT}")
            sdist = _download_sdist(root)
        _check_sha(sdist)
        if target.exists():
            shutil.rmtree(target)
        _extract(sdist, target)
    return target


def read_ground_truth(path: Path, source: str) -> list[Rated]:
    """Parse a ``<id>\\t<mean rating>\\t<text>`` file, HTML entities unescaped."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            score = float(parts[1])
        except (IndexError, ValueError):
            raise DataError(f"{path}:{lineno}: expected '<id>\\t<score>\\t<text>'") from None
        text = html.unescape(parts[2]).strip() if len(parts) > 2 else ""
        if text:
            rows.append(Rated(source=source, id=parts[0].strip(), score=score, text=text))
    return rows


@functools.lru_cache(maxsize=8)
def load_source(source: str, cache_dir: str | None = None) -> tuple[Rated, ...]:
    """Every labelled (non-neutral) text of one source, in a fixed seed-independent order."""
    if source not in SOURCES:
        raise DataError(f"sentiment: unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    folder = ensure_vader_data(cache_dir)
    rows = [r for r in read_ground_truth(folder / SOURCES[source], source) if label_for(r.score) is not None]
    Random(f"{SPLIT_SEED}/{source}").shuffle(rows)
    return tuple(rows)


def sentiment_rows(split: str = "train", limit: int | None = None, seed: int = 0, cache_dir: str | None = None) -> list[Rated]:
    """Rows of ``split``: movie ``test`` = first 2,000 of the fixed order, ``validation`` the next 500,
    ``train`` the rest (ordered by ``seed``); ``amazon``/``tweets``/``nyt`` the whole source."""
    if split not in SPLITS:
        raise DataError(f"task 'sentiment': unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if split in OOD_SPLITS:
        rows = list(load_source(split, cache_dir))
    else:
        movie = load_source("movie", cache_dir)
        bounds = {"test": (0, MOVIE_TEST), "validation": (MOVIE_TEST, MOVIE_TEST + MOVIE_VALIDATION),
                  "train": (MOVIE_TEST + MOVIE_VALIDATION, len(movie))}  # fmt: skip
        lo, hi = bounds[split]
        rows = list(movie[lo:hi])
        if split == "train":
            Random(seed).shuffle(rows)
    if limit is not None:
        if limit < 1:
            raise DataError(f"task 'sentiment': empty dataset (limit={limit})")
        rows = rows[:limit]
    return rows


def sentiment_example(tokenizer, row: Rated, style: str = "plain") -> Example:
    """``plain``: ``Review: {text}\\nSentiment:`` -> `` positive``; ``chat``: one turn, answer ``positive``."""
    if style == "chat":
        prompt, choices = CHAT_PROMPT.format(text=row.text), {label: label for label in LABELS}
    else:
        prompt, choices = PLAIN_PROMPT.format(text=row.text), {label: f" {label}" for label in LABELS}
    meta = {"task": "sentiment", "source": row.source, "id": row.id, "score": row.score}
    return prompt_response_example(tokenizer, prompt, choices[row.label], style=style, answer=row.label,
                                   choices=choices, meta=meta)  # fmt: skip


def sentiment_examples(
    tokenizer, split: str = "train", limit: int | None = None, seed: int = 0, style: str | None = None,
    cache_dir: str | None = None,
) -> list[Example]:  # fmt: skip
    """Examples of ``split`` (see :func:`sentiment_rows`); style defaults to ``plain``."""
    return [sentiment_example(tokenizer, row, style or "plain") for row in sentiment_rows(split, limit, seed, cache_dir)]
