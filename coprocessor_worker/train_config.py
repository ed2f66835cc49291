"""Training hyper-parameters (no torch import: the CLI builds its flags from this)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from coprocessor_worker.coprocessor import CoprocessorConfig


@dataclass
class TrainConfig:
    """Hyper-parameters; each field is a `deliberate train` flag of the same name."""

    method: Literal["lora", "full", "pause"] = "lora"
    n_latents: int = 8
    n_ahead: int = 16  # the quality gate reads ahead positions 8 and 16
    window: int = 256
    # documents: each row is cut from one document, its first row starting at the document's
    # first token, as a served context does; stream: documents joined with EOS (most rows then
    # hold the ends of unrelated documents in the prefix)
    windows: Literal["documents", "stream"] = "documents"
    positions: int = 12  # K augmentation positions per window
    min_prefix: int = 32
    batch_windows: int = 2
    grad_accum: int = 1
    steps: int = 3000
    lr: float = 1e-3  # LoRA (or full copy)
    lr_embed: float = 3e-3  # soft tokens and latent base
    lr_proj: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.3
    weight_decay: float = 0.0
    clip: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    output: Literal["residual", "direct"] = "residual"
    hidden_source: Literal["final_norm", "pre_norm"] = "final_norm"
    init_text: str = ","  # measured: the least harmful start of 7 tried (docs/coprocessor.md)
    # a checkpoint to start from: all its trained tensors if its method is this run's,
    # only its latent base if it is a pause-token checkpoint starting a coprocessor
    init_from: str = ""
    seed: int = 0
    # auto: bf16 only on CUDA or CPUs with AVX512-BF16/AMX; on AVX2-only CPUs bf16 matmuls
    # are emulated and many times slower than fp32 (measured on this project's machine).
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    threads: int = 1  # on a shared 2-core box, 2 OpenMP threads spin and run ~5x slower
    eval_every: int = 40
    eval_windows: int = 32
    save_every: int = 10
    snapshot_every: int = 0  # also keep RUN/step-N/ every this many steps (0: never)
    corpus: list[str] = field(default_factory=list)  # .txt/.jsonl paths; empty = bundled prose
    text_field: str = "text"

    def coprocessor_config(self) -> CoprocessorConfig:
        from coprocessor_worker.coprocessor import CoprocessorConfig

        return CoprocessorConfig(
            method=self.method,
            n_latents=self.n_latents,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            output=self.output,
            hidden_source=self.hidden_source,
            init_text=self.init_text,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
