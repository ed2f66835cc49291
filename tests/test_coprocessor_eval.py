"""Evaluation: scoring with latents equals a plain forward over the spliced sequence; the
bootstrap table and the quality gate; the whole report on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_store.value import ValuePolicy
from coprocessor_worker import data
from coprocessor_worker import evaluate as ev
from coprocessor_worker.model import CoprocessorConfig, build_model, load_decoder


def _models(tiny_llama: Path) -> dict:
    """pause and lora insert their latents; tail is lora replacing the context's tail."""
    torch.manual_seed(2)
    out = {}
    for name, method, placement in (
        ("pause", "pause", "insert"),
        ("lora", "lora", "insert"),
        ("tail", "lora", "replace_tail"),
    ):
        decoder, tokenizer = load_decoder(tiny_llama, torch.float32)
        config = CoprocessorConfig(method=method, n_latents=2, lora_rank=4, placement=placement)
        model = build_model(decoder, tokenizer, config, torch.float32)
        with torch.no_grad():
            for group in model.trainable_parameters().values():
                for p in group:
                    p.add_(torch.randn_like(p) * 0.1)
        out[name] = model
    return out


@pytest.mark.parametrize("name", ["lora", "tail"])
def test_continuation_scores_equal_a_plain_forward(tiny_llama: Path, name: str) -> None:
    model = _models(tiny_llama)[name]
    ctx = [11, 12, 13, 14, 15]
    conts = [[21, 22, 23], [31], [41, 42]]
    prefix = model.prefix_pass(torch.tensor([ctx]))
    kept = ctx[:-2] if name == "tail" else ctx  # tail: the vectors stand in for the last 2
    for use_latents in (False, True):
        scores = ev.continuation_logprobs(model, prefix, ctx, conts, use_latents, pad_id=0)
        for cont, score in zip(conts, scores, strict=True):
            with torch.no_grad():
                parts = [model.embed(torch.tensor(kept if use_latents else ctx))]
                if use_latents:
                    kv, _ = prefix
                    parts.append(
                        model.inserted_at(kv, torch.tensor([ctx]), torch.tensor([[len(ctx)]]))[0, 0]
                    )
                parts.append(model.embed(torch.tensor(cont)))
                embeds = torch.cat(parts)[None]
                with model.decoder_role():
                    logp = torch.log_softmax(model.decoder(inputs_embeds=embeds).logits[0], -1)
            start = embeds.shape[1] - len(cont)
            expected = logp[start - 1 : -1].gather(1, torch.tensor(cont)[:, None])[:, 0]
            np.testing.assert_allclose(score[0], expected.numpy(), atol=1e-5, rtol=1e-5)


def test_task_contexts_shorter_than_the_replaced_tail_are_scored_plainly(
    tiny_llama: Path,
) -> None:
    """The server serves such a context plainly (too-short); gathering its tail would index
    before the context's start."""
    decoder, tokenizer = load_decoder(tiny_llama, torch.float32)
    config = CoprocessorConfig(n_latents=128, lora_rank=4, placement="replace_tail")
    model = build_model(decoder, tokenizer, config, torch.float32)
    cfg = ev.EvalConfig(mc_items=3)
    contexts = [item.context for item in data.MULTIPLE_CHOICE_SETS["arc_easy"]()[:3]]
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in contexts]
    assert all(n < config.shortest_context for n in lengths)
    acc = ev.task_accuracy({"tail": model}, tokenizer, "arc_easy", cfg, pad_id=0)
    assert acc["tail"] == acc["none"]


def test_relative_change_table_and_gate() -> None:
    rng = np.random.default_rng(0)
    none = rng.normal(3.0, 0.5, size=(300, 16))
    better = none - 0.02 + rng.normal(0, 0.01, size=none.shape)
    worse = none + 0.05
    cfg = ev.EvalConfig(n_bootstrap=500)
    table = ev.relative_change_table({"none": none, "better": better, "worse": worse}, cfg)
    row = table["better"]["8"]
    assert row["ci_low"] < row["change"] < row["ci_high"] < 0
    assert abs(row["change"] - (np.exp(-0.02) - 1)) < 0.003
    assert ev.quality_gate(table["better"])["passed"]
    gate = ev.quality_gate(table["worse"])
    assert not gate["passed"] and set(gate["values"]) == {"8", "16"}
    assert "positions 8 and 16" in gate["rule"]
    # A point estimate just below zero with a wide interval reaching past epsilon fails too.
    wide = {
        "8": {"change": -0.001, "ci_low": -0.05, "ci_high": 0.03},
        "16": {"change": -0.01, "ci_low": -0.02, "ci_high": 0.0},
    }
    assert not ev.quality_gate(wide)["passed"]


def test_evaluate_writes_json_markdown_png(tiny_llama: Path, tmp_path: Path) -> None:
    models = _models(tiny_llama)
    _, tokenizer = load_decoder(tiny_llama, torch.float32)
    cfg = ev.EvalConfig(
        n_docs=6,
        mc_items=3,
        batch_docs=4,
        n_bootstrap=50,
        window=96,
        n_ood_docs=4,
        qa_items=4,
        ood_qa_items=3,
    )
    result = ev.evaluate(models, tokenizer, cfg, tmp_path, ["arc_easy", "lambada", "hellaswag"])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert set(saved["text"]) == {"in_domain", "out_of_domain"}
    assert saved["text"]["in_domain"]["n_docs"] == 6
    assert saved["text"]["out_of_domain"]["n_docs"] == 4
    for entry in saved["text"].values():
        for table in ("perplexity", "perplexity_with_value_check"):
            assert set(entry[table]) == {"none", "pause", "lora", "tail"}
            assert set(entry[table]["tail"]) == {"1", "2", "4", "8", "16", "mean"}
        assert 0 <= entry["served_fraction"]["lora"] <= 1
    for form, n in (("qa", 4), ("chat", 4), ("qa_out_of_domain", 3)):
        summary = saved["serving"][form]
        assert summary["n"] == n and 0 <= summary["acc_none"] <= 1
        assert {"raw", "with_value_check", "served_fraction"} <= set(summary["lora"])
    for task in ("arc_easy", "lambada", "hellaswag"):
        assert set(saved["tasks"][task]) == {"none", "pause", "lora", "tail"}
        assert all(0 <= v["acc"] <= 1 for v in saved["tasks"][task].values())
    assert "acc_norm" in saved["tasks"]["hellaswag"]["none"]
    md = (tmp_path / "result.md").read_text()
    assert "| lora |" in md and "pos 16" in md and "Quality gate (lora)" in md
    assert "| qa | lora |" in md and "| chat | lora |" in md
    assert (tmp_path / "result.png").stat().st_size > 5000
    gate = result["quality_gate"]["lora"]
    assert set(gate["sets"]) == {"in_domain", "out_of_domain", "qa", "chat", "qa_out_of_domain"}
    # A random tiny model's latents are far from harmless: its raw gate must fail.
    assert gate["passed"] is False
    # Before the value check has min_contexts figures, no context is served latents.
    first = ValuePolicy().min_contexts
    assert saved["text"]["in_domain"]["served_fraction"]["lora"] <= 1 - first / (6 * 8)
    assert isinstance(gate["passed_with_value_check"], bool)


def _gate_result(name: str, ppl_change: float, answer_change: float) -> dict:
    def row(change: float) -> dict:
        cell = {"change": change, "ci_low": change - 0.01, "ci_high": change + 0.001}
        return {"8": cell, "16": cell}

    def effect(change: float) -> dict:
        return {"change": change, "ci_low": change - 0.01, "ci_high": change + 0.001}

    text = {
        "n_docs": 1,
        "perplexity": {name: row(ppl_change), "none": {}},
        "perplexity_with_value_check": {name: row(0.0), "none": {}},
        "served_fraction": {name: 0.5},
    }
    serving = {"n": 1, "acc_none": 0.5, name: {"raw": effect(answer_change),
               "with_value_check": effect(0.0)}}  # fmt: skip
    return {
        "text": {"in_domain": text, "out_of_domain": text},
        "serving": {"qa": serving, "chat": serving},
    }


def test_checkpoint_gate_decides_on_every_set_both_ways() -> None:
    good = ev.checkpoint_gate(_gate_result("lora", -0.02, -0.02), "lora")
    assert good["passed"] and good["passed_with_value_check"]
    harmful_answers = ev.checkpoint_gate(_gate_result("lora", -0.02, +0.03), "lora")
    assert not harmful_answers["passed"] and harmful_answers["passed_with_value_check"]
    assert not harmful_answers["sets"]["qa"]["raw"]["passed"]
    assert harmful_answers["sets"]["in_domain"]["raw"]["passed"]
    harmful_text = ev.checkpoint_gate(_gate_result("lora", +0.02, -0.02), "lora")
    assert not harmful_text["passed"] and not harmful_text["sets"]["out_of_domain"]["raw"]["passed"]


@pytest.mark.parametrize("name", ["pause", "lora"])
def test_record_in_checkpoint_keeps_the_fingerprint(
    tiny_llama: Path, tmp_path: Path, name: str
) -> None:
    from cache_store.checkpoint import CheckpointInfo, read_evaluation
    from cache_store.fingerprint import checkpoint_fingerprint, decoder_fingerprint
    from coprocessor_worker.checkpoint_io import save_checkpoint

    model = _models(tiny_llama)[name]
    ckpt = save_checkpoint(
        model, tmp_path / name, decoder_fingerprint=decoder_fingerprint(tiny_llama)
    )
    before = checkpoint_fingerprint(ckpt)
    assert not CheckpointInfo.read(ckpt).gate_passed  # never evaluated
    result = _gate_result(name, -0.02, -0.02) | {"tasks": {}, "config": {}}
    result |= {"value_check": {}, "value_policy": {}}
    result["quality_gate"] = {name: ev.checkpoint_gate(result, name)}
    ev.record_in_checkpoint(ckpt, name, result)
    evaluation, gate = read_evaluation(ckpt)
    assert gate["passed"] and gate["passed_with_value_check"]
    assert evaluation["serving"]["qa"]["raw"]["change"] == -0.02
    info = CheckpointInfo.read(ckpt)
    assert info.gate(value_check=True) and info.gate(value_check=False)
    # Recording an evaluation changes no prefix key: stored payloads stay valid.
    assert checkpoint_fingerprint(ckpt) == before == info.fingerprint


def test_a_checkpoint_of_another_format_version_is_refused(tmp_path: Path) -> None:
    from cache_store.checkpoint import CheckpointInfo

    (tmp_path / "deliberate.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format 99"):
        CheckpointInfo.read(tmp_path)


def test_read_log_keeps_the_last_record_of_a_resumed_step(tmp_path: Path) -> None:
    records = [
        {"event": "eval", "step": 0, "rel_ppl_change_mean": 1.0, "rel_ppl_change": {"8": 0.5}},
        {"event": "step", "step": 1, "loss": 4.0},
        {"event": "step", "step": 2, "loss": 3.9},
        {"event": "step", "step": 2, "loss": 3.8},  # replayed after a resume from step 1
        {"event": "eval", "step": 2, "rel_ppl_change_mean": 0.5, "rel_ppl_change": {"8": 0.1}},
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    steps, evals = ev.read_log(tmp_path)
    assert [s["loss"] for s in steps] == [4.0, 3.8]
    assert [e["step"] for e in evals] == [0, 2]
    ev.plot_learning_curves({"run": tmp_path}, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 5000


def test_eval_and_train_flags_parse_beside_settings(tmp_path: Path) -> None:
    """`--coprocessor` of `deliberate eval` must not collide with the Settings field of the
    same name (the serving checkpoint), and train flags mirror TrainConfig."""
    from coprocessor_worker.train_config import TrainConfig
    from deliberate.cli import build_parser
    from deliberate.commands import settings_from_args

    args = build_parser().parse_args(
        ["eval", "--coprocessor", "a", "--coprocessor", "b", "--pause", "c", "--out", "o"]
    )
    assert args.coprocessors == [Path("a"), Path("b")] and args.pause == [Path("c")]
    assert settings_from_args(args).coprocessor is None
    args = build_parser().parse_args(
        ["train", "--out", str(tmp_path), "--method", "pause", "--n-latents", "4", "--lr", "0.01"]
    )
    cfg = TrainConfig(
        **{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    )
    assert (cfg.method, cfg.n_latents, cfg.lr, cfg.n_ahead) == ("pause", 4, 0.01, 16)
