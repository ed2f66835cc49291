"""The training loop end to end on a tiny random Llama and real prose: it trains, logs,
resumes exactly where it stopped, and warm-starts from a checkpoint."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from coprocessor_worker import data
from coprocessor_worker.checkpoint_io import read_checkpoint_state
from coprocessor_worker.train import train
from coprocessor_worker.train_config import TrainConfig
from deliberate.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "prose.jsonl"
    # the corpus is split again by document hash: take documents from both bundled splits
    docs = data.bundled_documents("train")[:60] + data.bundled_documents("held_out")[:20]
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return path


def _config(corpus: Path, **overrides: object) -> TrainConfig:
    small = TrainConfig(
        n_latents=2,
        n_ahead=4,
        window=64,
        positions=3,
        min_prefix=8,
        batch_windows=2,
        steps=2,
        warmup=1,
        eval_every=2,
        eval_windows=4,
        save_every=1,
        lora_rank=4,
        dtype="float32",
        corpus=[str(corpus)],
    )
    return replace(small, **overrides)


def _steps(run: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run may log a step twice)."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["event"] == "step"}


def _assert_same_state(a: Path, b: Path) -> None:
    sa, sb = read_checkpoint_state(a), read_checkpoint_state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=1e-6, msg=name)


def test_resumed_run_equals_an_uninterrupted_one(tiny_llama: Path, corpus: Path, tmp_path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(corpus, steps=4, snapshot_every=1), tiny_llama, straight)
    train(_config(corpus, steps=2), tiny_llama, resumed)
    assert sorted(_steps(resumed)) == [1, 2]
    train(_config(corpus, steps=4), tiny_llama, resumed)

    assert sorted(_steps(resumed)) == [1, 2, 3, 4]
    for step, record in _steps(straight).items():
        assert math.isfinite(record["loss"]) and record["tokens_per_s"] > 0
        assert _steps(resumed)[step]["loss"] == pytest.approx(record["loss"], abs=1e-5)
    _assert_same_state(straight / "last", resumed / "last")
    # training moved the tensors away from their start
    with pytest.raises(AssertionError):
        _assert_same_state(straight / "step-1", straight / "step-4")

    # the runs' held-out curves, through the CLI
    plots = tmp_path / "plots"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--curves", str(straight), str(resumed), "--out", str(plots)])
    assert exit_.value.code == 0
    assert (plots / "curves.png").stat().st_size > 5000


def test_warm_start_from_a_checkpoint(tiny_llama: Path, corpus: Path, tmp_path: Path) -> None:
    trained = tmp_path / "trained"
    train(_config(corpus, steps=2, snapshot_every=2), tiny_llama, trained)

    # same method: every trained tensor (steps=0 saves the start as best/ after evaluating it)
    warm = tmp_path / "warm"
    train(_config(corpus, steps=0, init_from=str(trained / "step-2")), tiny_llama, warm)
    _assert_same_state(trained / "step-2", warm / "best")

    # a pause-token checkpoint starts a coprocessor's latent base
    pause = tmp_path / "pause"
    train(_config(corpus, method="pause"), tiny_llama, pause)
    from_pause = tmp_path / "from-pause"
    train(_config(corpus, steps=0, init_from=str(pause / "last")), tiny_llama, from_pause)
    torch.testing.assert_close(
        read_checkpoint_state(from_pause / "best")["base"],
        read_checkpoint_state(pause / "last")["base"],
    )

    # anything else is refused with what to do
    with pytest.raises(ValueError, match="pause-token checkpoint"):
        train(
            _config(corpus, method="pause", steps=0, init_from=str(trained / "last")),
            tiny_llama,
            tmp_path / "refused",
        )
    with pytest.raises(ValueError, match="--n-latents 2"):
        train(
            _config(corpus, n_latents=3, steps=0, init_from=str(trained / "last")),
            tiny_llama,
            tmp_path / "refused-n",
        )


def test_qa_rows_score_the_answer_after_the_passage(tiny_llama: Path, tmp_path: Path) -> None:
    """Serving-form rows: the point sits right after the passage, and the loss weights pick
    exactly the answer's tokens (not the question's), from training-split passages only."""
    from coprocessor_worker.model import load_decoder

    _, tokenizer = load_decoder(tiny_llama, torch.float32)
    cfg = replace(TrainConfig(), qa_rows=3, window=128, qa_max_ahead=40, min_prefix=8)
    rows = data.load_qa_rows(cfg, tokenizer, tmp_path)
    held_out = {item.passage for item in data.qa_items("held_out")}
    first = data.qa_items("train")[0]
    assert first.passage not in held_out
    ids, pos, weights = data.qa_batch(cfg, rows, step=0)
    assert ids.shape[0] == 3 and pos.shape == (3, 1)
    for b in range(len(ids)):
        anchor = int(pos[b, 0])
        scored = np.flatnonzero(weights[b, 0])
        assert len(scored) and np.array_equal(scored, np.arange(scored[0], scored[-1] + 1))
        between = tokenizer.decode(ids[b, anchor : anchor + scored[0]].tolist())
        # the question sits between the latents and the answer, as in serving
        assert between.startswith("\nQuestion: ") and between.endswith("\nAnswer:")


def test_training_with_qa_rows_logs_and_resumes(corpus: Path, tmp_path: Path, tiny_llama: Path):
    cfg = _config(corpus, qa_rows=2, steps=2)
    train(cfg, tiny_llama, tmp_path / "run")
    steps = _steps(tmp_path / "run")
    assert sorted(steps) == [1, 2] and all(math.isfinite(s["loss"]) for s in steps.values())
