"""Training hyper-parameters (no torch import: the CLI builds its flags from this)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Annotated, Any, Literal

from coprocessor_worker.data import BUNDLED_SOURCES, EXTRA_SOURCES

if TYPE_CHECKING:
    from coprocessor_worker.model import CoprocessorConfig


@dataclass
class TrainConfig:
    """Hyper-parameters; each field is a `deliberate train` flag of the same name."""

    method: Annotated[
        Literal["lora", "full", "pause"],
        "LoRA adapters on the decoder, a full trainable copy, or pause tokens (the baseline)",
    ] = "lora"
    n_latents: Annotated[int, "latent embeddings per prefix (N_L)"] = 8
    n_ahead: Annotated[int, "tokens after each point in the loss (N_A); the gate reads 8, 16"] = 16
    window: Annotated[int, "tokens per training row"] = 256
    windows: Annotated[
        Literal["documents", "stream"],
        "documents: rows cut from one document each, the first at its first token, as a "
        "served context; stream: documents joined with EOS (rows then mix documents)",
    ] = "documents"
    positions: Annotated[int, "augmentation points per row (K)"] = 12
    min_prefix: Annotated[int, "shortest prefix before a point"] = 32
    batch_windows: Annotated[int, "rows per micro-batch"] = 2
    grad_accum: Annotated[int, "micro-batches per optimizer step"] = 1
    steps: Annotated[int, "optimizer steps (the cosine schedule's horizon)"] = 3000
    lr: Annotated[float, "learning rate of the LoRA adapters (or the full copy)"] = 1e-3
    lr_embed: Annotated[float, "learning rate of the soft tokens and latent base"] = 3e-3
    lr_proj: Annotated[float, "learning rate of the output projection"] = 3e-3
    warmup: Annotated[int, "linear warm-up steps"] = 20
    min_lr_ratio: Annotated[float, "final learning rate as a fraction of the peak"] = 0.3
    weight_decay: Annotated[float, "AdamW weight decay"] = 0.0
    clip: Annotated[float, "gradient-norm clipping"] = 1.0
    lora_rank: Annotated[int, "LoRA rank"] = 16
    lora_alpha: Annotated[float, "LoRA alpha"] = 32.0
    output: Annotated[
        Literal["residual", "direct"],
        "residual: latents = base + projected states (step 0 = pause tokens); direct: W h",
    ] = "residual"
    hidden_source: Annotated[
        Literal["final_norm", "pre_norm"], "coprocessor states after or before the final norm"
    ] = "final_norm"
    init_text: Annotated[
        str, "text whose embedding starts the latents (measured least harmful of 7)"
    ] = ","
    replay_last_token: Annotated[
        bool,
        "after the latents, the context's last token's embedding once more, so the first "
        "token after them is predicted from a real token, as served before a prompt",
    ] = False
    placement: Annotated[
        Literal["insert", "replace_tail"],
        "insert: latents after the context (the paper's); replace_tail: latents added to the "
        "embeddings of the context's own last N_L tokens, zero at step 0 (= the plain decoder)",
    ] = "insert"
    init_from: Annotated[
        str,
        "checkpoint to start from: all its trained tensors if of this method, only its latent "
        "base if a pause-token checkpoint",
    ] = ""
    seed: Annotated[int, "seed of the initialisation and of every batch"] = 0
    # bf16 matmuls are emulated on AVX2-only CPUs, many times slower than fp32 (measured)
    dtype: Annotated[
        Literal["auto", "bfloat16", "float32"],
        "compute dtype; auto = bf16 only on CUDA or CPUs with AVX512-BF16/AMX",
    ] = "auto"
    # on a shared 2-core box, 2 OpenMP threads spin and run ~5x slower (measured)
    threads: Annotated[int, "torch CPU threads"] = 1
    eval_every: Annotated[int, "steps between held-out evaluations"] = 40
    eval_windows: Annotated[int, "held-out rows per evaluation"] = 32
    save_every: Annotated[int, "steps between resumable saves to RUN/last"] = 10
    snapshot_every: Annotated[int, "also keep RUN/step-N/ every this many steps (0: never)"] = 0
    qa_rows: Annotated[
        int,
        "rows per step in the serving form (training passage, then a real question, then its "
        "answer), latents after the passage, loss on the answer; 0: prose only",
    ] = 0
    qa_weight: Annotated[float, "weight of the QA rows' answer loss beside the prose loss"] = 1.0
    qa_max_ahead: Annotated[int, "longest question + answer kept for QA rows, in tokens"] = 48
    kl_weight: Annotated[
        float,
        "weight of the do-no-harm term on the prose rows: KL(plain decoder || augmented) of "
        "the next-token distributions at the ahead tokens; 0: off",
    ] = 0.0
    corpus: Annotated[list[str], ".txt/.jsonl files or folders; none: the bundled prose"] = field(
        default_factory=list
    )
    sources: Annotated[
        list[str],
        "bundled sources to train on (without --corpus); off by default: math (problems with "
        "worked solutions) and fortunes (verse, quotations, jokes; apt-get install fortunes)",
    ] = field(
        default_factory=lambda: list(BUNDLED_SOURCES),
        metadata={"choices": BUNDLED_SOURCES + EXTRA_SOURCES},
    )
    text_field: Annotated[str, "the text field of .jsonl rows"] = "text"

    def coprocessor_config(self) -> CoprocessorConfig:
        from coprocessor_worker.model import CoprocessorConfig

        return CoprocessorConfig(
            method=self.method,
            n_latents=self.n_latents,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            output=self.output,
            hidden_source=self.hidden_source,
            init_text=self.init_text,
            replay_last_token=self.replay_last_token,
            placement=self.placement,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
