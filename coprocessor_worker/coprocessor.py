"""The serving-side API of a trained coprocessor: token-id prefixes in, latents out, and the
value check's figure from the same packed passes (docs/architecture.md). The model maths is
in model.py, the checkpoint files in checkpoint_io.py."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cache_store.checkpoint import read_evaluation
from cache_store.value import ValueFigure
from coprocessor_worker.checkpoint_io import load_model
from coprocessor_worker.model import CoprocessorModel, torch_dtype


@dataclass
class Coprocessor:
    """The serving-side API: prefixes of token ids in, latents [N_L, hidden] out."""

    model: CoprocessorModel
    meta: dict[str, Any]
    fingerprint: str
    decoder_fingerprint: str
    dtype: torch.dtype = torch.bfloat16
    pad_id: int = 0
    tokenizer: Any = field(default=None, repr=False)

    @property
    def n_latents(self) -> int:
        """Vectors per payload: the latents and, if the checkpoint replays it, the token."""
        return self.model.config.n_inserted

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    @property
    def method(self) -> str:
        return self.model.config.method

    @classmethod
    def load(
        cls,
        checkpoint_dir: Path,
        decoder_dir: Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        compute_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> Coprocessor:
        """`dtype` is the latents' dtype (what the server inserts); `compute_dtype` what the
        model runs in, by default picked from the hardware (`hardware.auto_dtype`: fp32 on
        CPUs without native bf16); `device` where (latents always come back in host memory,
        ready to serialize)."""
        compute_dtype = compute_dtype or torch_dtype("auto")
        from cache_store.fingerprint import checkpoint_fingerprint

        model, meta, tokenizer = load_model(
            Path(checkpoint_dir), Path(decoder_dir), compute_dtype=compute_dtype
        )
        model.to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(
            model=model,
            meta=meta,
            fingerprint=checkpoint_fingerprint(checkpoint_dir),
            decoder_fingerprint=meta["decoder_fingerprint"],
            dtype=dtype,
            pad_id=int(pad),
            tokenizer=tokenizer,
        )

    def _batch(self, prefixes: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids [B, T] and lengths [B]: the decoder is causal, so real tokens
        never see the padding, and the soft tokens' mask admits only cache positions < P."""
        if any(len(p) == 0 for p in prefixes):
            raise ValueError("an empty prefix has no cache to deliberate on")
        shortest = self.model.config.shortest_context
        if any(len(p) < shortest for p in prefixes):
            raise ValueError(f"latents that replace a prefix's tail need {shortest} tokens")
        lens = torch.tensor([len(p) for p in prefixes])
        ids = torch.full((len(prefixes), int(lens.max())), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prefixes):
            ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        device = self.model.base.device
        return ids.to(device), lens.to(device)

    @torch.no_grad()
    def latents(self, prefixes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """What goes in after each prefix, [n_latents, hidden] in `dtype`, for positions
        P..P+n_latents-1."""
        if not prefixes:
            return []
        ids, lens = self._batch(prefixes)
        kv = None if self.method == "pause" else self.model.prefix_pass(ids)[0]
        lat = self.model.inserted_at(kv, ids, lens[:, None])[:, 0]
        # Callers serialize the latents (safetensors needs host memory): hand back CPU tensors,
        # copies (pause latents are the parameter itself).
        return [row.to(self.dtype, copy=True).cpu().contiguous() for row in lat]

    @torch.no_grad()
    def latents_with_value(
        self, prefixes: Sequence[Sequence[int]], check: ValueCheck
    ) -> list[tuple[torch.Tensor, ValueFigure | None]]:
        """Latents for each prefix, as `latents`, and the value check's figure of each (None
        for a prefix outside the check's sample or too short to hold a check point), from the
        same packed passes."""
        if not prefixes:
            return []
        ids, lens = self._batch(prefixes)
        points = [check.points_for(p) for p in prefixes]
        if not any(points):
            return [(row, None) for row in self.latents(prefixes)]
        # Rows with fewer points are filled with another row's point (inside the padded batch,
        # so it can be computed); only each row's own points are read back.
        width = max(len(p) for p in points)
        filler = next(p[0] for p in points if p)
        grid = torch.tensor([p + [filler] * (width - len(p)) for p in points], device=ids.device)
        between = check.prompt_ids(self.tokenizer)
        lat, delta = self.model.latents_and_check(ids, lens, grid, check.tokens, between)
        out = []
        for row, (latents, row_points) in enumerate(zip(lat, points, strict=True)):
            scored = delta[row, : len(row_points), check.skip :].reshape(-1).float().cpu()
            out.append((latents.to(self.dtype).cpu().contiguous(), check.figure(scored)))
        return out


@dataclass(frozen=True)
class ValueCheck:
    """Where the value check measures: up to `points` earlier points of a context, spaced
    `tokens` apart back from its end, each followed by `tokens` tokens of the context's own
    tail. Scored are ahead positions skip+1..tokens: in serving a prompt sits between the
    latents and the answer, so the first tokens after the latents are not what is scored.
    One point by default: it costs half the extra decoder tokens of two (docs/benchmarks.md)
    and predicted the effect at a context's other points no worse than four (issue 11's
    probe). `prompt`, if set, is text put between each point and its tail in both runs (with
    and without latents), as a served prompt sits between the latents and the answer. A
    checkpoint evaluated with another geometry keeps it (`recorded_for`)."""

    points: int = 1
    tokens: int = 16
    skip: int = 3
    min_prefix: int = 32
    prompt: str = ""
    sample: float = 0.5
    """Share of contexts checked, picked by a hash of their tokens, so a context always gets
    the same answer; the others are published without a figure and served on the running
    estimate alone. The decision rests on that estimate (one context's figure is mostly
    noise around a systematic effect, issue 11's probe), so half the contexts are evidence
    enough, at half the check's cost: on a single short context the check's pass costs
    about half the forward (docs/benchmarks.md, value check)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.sample <= 1.0:
            raise ValueError(f"the value check's sample must be in (0, 1], not {self.sample}")

    def prompt_ids(self, tokenizer: Any) -> torch.Tensor | None:
        if not self.prompt:
            return None
        ids = tokenizer(self.prompt, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    @classmethod
    def recorded_for(cls, checkpoint_dir: Path) -> ValueCheck:
        """The geometry a checkpoint's recorded evaluation judged the check with (its gate
        holds for that geometry), else the default."""
        evaluation, _ = read_evaluation(checkpoint_dir)
        recorded = evaluation.get("value_check", {})
        if recorded:  # recorded before sampling existed: every context was checked
            recorded = {"sample": 1.0, **recorded}
        return cls(**{k: v for k, v in recorded.items() if k in cls.__dataclass_fields__})

    def checks(self, prefix: Sequence[int]) -> bool:
        """Whether this context is in the checked sample (a hash of its tokens)."""
        if self.sample >= 1.0:
            return True
        digest = hashlib.blake2b(array("q", prefix).tobytes(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < self.sample * 2**64

    def points_for(self, prefix: Sequence[int]) -> list[int]:
        """The check points of a context: none if it is outside the sample or too short."""
        if not self.checks(prefix):
            return []
        length = len(prefix)
        out = []
        for j in range(1, self.points + 1):
            point = length - j * self.tokens
            if point < self.min_prefix:
                break
            out.append(point)
        return out

    def figure(self, deltas: torch.Tensor) -> ValueFigure | None:
        if deltas.numel() == 0:
            return None
        std_error = float(deltas.std() / deltas.numel() ** 0.5) if deltas.numel() > 1 else 0.0
        return ValueFigure(float(deltas.mean()), std_error, int(deltas.numel()))
