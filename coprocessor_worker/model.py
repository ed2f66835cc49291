"""The coprocessor of "Deliberation in Latent Space via Differentiable Cache Augmentation"
(Liu et al., ICML 2025), for Hugging Face causal LMs (Llama, Qwen2, Gemma-2 ...).

A frozen decoder has read a prefix of P tokens (positions 0..P-1) into its KV cache. The
coprocessor - the same network with LoRA adapters switched on (or a full trainable copy) -
reads N_L trainable soft tokens at positions P..P+N_L-1 that attend to that cache, and its
final hidden states become N_L latent embeddings. The decoder then sees the latents at
positions P..P+N_L-1, in its *input* embedding space, exactly as the server inserts them
through vLLM's `prompt_embeds`; the text after the prefix starts at P+N_L.

Latents (method "lora"/"full"), with h the coprocessor's final states RMS-normalised:

    latents = base + W h / hidden_size        (W zero-initialised)

so at step 0 the latents are the trainable `base` embeddings alone, i.e. the pause-token
model, and the coprocessor can only add what the context tells it. The 1/hidden_size factor
makes one Adam step move a latent by about the learning rate per component, as it does for
`base` (W's gradient is nearly rank one, so an unscaled W would move ~hidden_size x faster).
Method "pause" is the paper's baseline: latents = base, independent of the prefix.

Placement "replace_tail" (an option; the paper inserts): the latents are added to the input
embeddings of the prefix's own last N_L tokens instead of going in after it, with `base`
starting at zero, so step 0 is exactly the plain decoder. Only `inserted_at` (what the
decoder sees) and `group_start` (where it sits) differ; every pass below uses both.

Packed training (DESIGN §6): for K augmentation positions p_1..p_K of one sequence, one
no-grad decoder pass gives the cache; the coprocessor runs all K groups of soft tokens in one
forward and the decoder runs all K groups of [latents_k, ahead tokens] in one forward, group
k attending only to cache positions < p_k and causally to itself, through a 4D attention mask
and explicit position ids. `naive_nll` is the per-position loop it must equal (tests show it).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cache_store import checkpoint as placement_rules
from coprocessor_worker.hardware import auto_dtype

Method = Literal["lora", "full", "pause"]
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [B, heads, T, dim]


def torch_dtype(name: str | None) -> torch.dtype:
    """ "bfloat16" | "float16" | "float32" | "auto"/None (the hardware's, hardware.auto_dtype)."""
    name = auto_dtype() if name in (None, "auto") else name
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


@dataclass
class CoprocessorConfig:
    method: Method = "lora"
    n_latents: int = 8
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    # "residual": latents = base + W h / H (default). "direct": latents = W h, W starting at
    # `direct_scale` x identity (the pilot's rescaled final states), no base.
    output: Literal["residual", "direct"] = "residual"
    direct_scale: float = 0.063
    # Final states after the decoder's final norm (HF's last hidden state) or before it.
    hidden_source: Literal["final_norm", "pre_norm"] = "final_norm"
    # Soft tokens and base start as the embeddings of this text's tokens (cycled to N_L);
    # "," harmed the frozen decoder least of 7 starts tried (docs/coprocessor.md).
    init_text: str = ","
    # After the N_L latents, the context's last token's embedding once more, so the first
    # token after them is predicted from a real token, as in serving, where a prompt's tokens
    # follow (Coconut's end-of-thought marker, xRAG). The server inserts N_L + 1 vectors.
    replay_last_token: bool = False
    # "insert": the vectors go in after the prefix, at P..P+n-1 (the paper's placement).
    # "replace_tail": they replace the embeddings of the prefix's own last n tokens, as
    # embed(token) + latent with the latent zero at step 0, so an untrained coprocessor is
    # exactly the plain decoder and training can only move it where the loss says it helps
    # (inserted positions start far above the baseline loss: docs/coprocessor.md).
    placement: Literal["insert", "replace_tail"] = "insert"

    def __post_init__(self) -> None:
        if self.placement == "replace_tail" and self.replay_last_token:
            raise ValueError("replay_last_token needs inserted latents, not replace_tail")

    @property
    def n_inserted(self) -> int:
        """How many vectors go in after the prefix: the latents, and the replayed token."""
        return self.n_latents + int(self.replay_last_token)

    # Where the vectors go, by the one rule the server also reads (cache_store/checkpoint.py).
    @property
    def replaced_tokens(self) -> int:
        return placement_rules.replaced_tokens(self.placement, self.n_inserted)

    @property
    def added_positions(self) -> int:
        return placement_rules.added_positions(self.placement, self.n_inserted)

    @property
    def shortest_context(self) -> int:
        return placement_rules.shortest_context(self.placement, self.n_inserted)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoprocessorConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "lora_targets" in known:
            known["lora_targets"] = tuple(known["lora_targets"])
        return cls(**known)


def group_mask(prefix_lens: torch.Tensor, cache_len: int, group_len: int) -> torch.Tensor:
    """Boolean attention mask [B, 1, K*G, cache_len + K*G] (True = may attend) for K groups of
    G query tokens: group k sees cache positions < prefix_lens[b, k] and its own earlier tokens.
    """
    b, k = prefix_lens.shape
    t = torch.arange(cache_len, device=prefix_lens.device)
    cache_part = t[None, None, :] < prefix_lens[:, :, None]  # [B, K, T]
    cache_part = cache_part[:, :, None, :].expand(b, k, group_len, cache_len)
    cache_part = cache_part.reshape(b, k * group_len, cache_len)
    idx = torch.arange(k * group_len, device=prefix_lens.device)
    same_group = (idx[:, None] // group_len) == (idx[None, :] // group_len)
    causal = idx[None, :] <= idx[:, None]
    group_part = (same_group & causal).expand(b, -1, -1)
    return torch.cat([cache_part, group_part], dim=-1)[:, None]


def group_positions(prefix_lens: torch.Tensor, group_len: int) -> torch.Tensor:
    """Position ids [B, K*G]: group k's tokens sit at p_k, p_k+1, ..., right after its prefix."""
    offsets = torch.arange(group_len, device=prefix_lens.device)
    return (prefix_lens[:, :, None] + offsets).reshape(prefix_lens.shape[0], -1)


class CoprocessorModel(nn.Module):
    """Frozen decoder + coprocessor + latent parameters; the trainable part is small."""

    def __init__(
        self, decoder: nn.Module, config: CoprocessorConfig, init_ids: torch.Tensor | None = None
    ):
        super().__init__()
        self.config = config
        for p in decoder.parameters():
            p.requires_grad_(False)
        hidden = decoder.config.hidden_size
        self.hidden_size = hidden
        self.peft: nn.Module | None = None
        self.lora_layers: list[nn.Module] = []
        self.full_copy: nn.Module | None = None
        if config.method == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                target_modules=list(config.lora_targets),
                lora_dropout=0.0,
                bias="none",
            )
            # LoRA layers are injected into the decoder's modules in place: one copy of the
            # weights serves both roles (adapters off = decoder, on = coprocessor).
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.peft = get_peft_model(decoder, lora)
            self.decoder = self.peft.get_base_model()
            self.lora_layers = [m for m in self.peft.modules() if isinstance(m, BaseTunerLayer)]
        else:
            self.decoder = decoder
            if config.method == "full":
                self.full_copy = copy.deepcopy(decoder).float()
                # The copy's layers and final norm train; its token embeddings and LM head
                # are never used (inputs are soft tokens, outputs are hidden states).
                for name, p in self.full_copy.model.named_parameters():
                    p.requires_grad_(not name.startswith("embed_tokens"))
        embed = self.decoder.get_input_embeddings().weight
        # "\n" in GPT-2-like vocabularies when no tokenizer picked the initial tokens.
        ids = init_ids if init_ids is not None and len(init_ids) else torch.tensor([198])
        init = embed.detach().float()[ids[torch.arange(config.n_latents) % len(ids)]].clone()
        # Replacing the tail, `base` is an offset to real embeddings: zero means no change.
        replacing = config.placement == "replace_tail"
        self.base = nn.Parameter(torch.zeros_like(init) if replacing else init.clone())
        if config.method != "pause":
            self.soft_tokens = nn.Parameter(init.clone())
            self.proj = nn.Linear(hidden, hidden, bias=False)
            with torch.no_grad():
                if config.output == "residual":
                    self.proj.weight.zero_()
                else:
                    self.proj.weight.copy_(torch.eye(hidden) * config.direct_scale)
        self.compute_dtype = torch.float32

    # --- plumbing -----------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        # cache_enabled=False: autocast otherwise keeps bf16 copies of weights that require
        # grad for the whole block, and would silently evaluate stale LoRA weights (pilot).
        return torch.autocast(
            "cpu",
            dtype=torch.bfloat16,
            enabled=self.compute_dtype == torch.bfloat16,
            cache_enabled=False,
        )

    @contextlib.contextmanager
    def decoder_role(self) -> Iterator[None]:
        """The plain frozen decoder: LoRA adapters off. Each LoRA layer is switched directly:
        peft's `disable_adapter` first scans the whole model's status, which made a switch
        cost about 60 ms here (8 ms this way), once or twice per worker batch."""
        if self.peft is None or self.lora_layers[0].disable_adapters:  # none, or already off
            yield
            return
        for layer in self.lora_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.lora_layers:
                layer.enable_adapters(True)

    def _attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        # SDPA takes a boolean mask; eager attention (e.g. Gemma-2) adds a float one.
        if getattr(self.decoder.config, "_attn_implementation", "sdpa") == "sdpa":
            return mask
        dtype = torch.bfloat16 if self.compute_dtype == torch.bfloat16 else torch.float32
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(ids)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"embed": [], "proj": [], "lora": []}
        if self.config.method == "pause" or self.config.output == "residual":
            groups["embed"].append(self.base)  # "direct" latents have no base
        if self.config.method != "pause":
            groups["embed"].append(self.soft_tokens)
            groups["proj"].append(self.proj.weight)
            if self.peft is not None:
                groups["lora"] = [p for n, p in self.peft.named_parameters() if "lora_" in n]
            elif self.full_copy is not None:
                groups["lora"] = [p for p in self.full_copy.parameters() if p.requires_grad]
        return groups

    # --- the three passes ---------------------------------------------------------------

    @torch.no_grad()
    def prefix_pass(self, ids: torch.Tensor) -> tuple[KV, torch.Tensor]:
        """Frozen decoder over [B, T] token ids: its KV cache and last hidden states."""
        with self.decoder_role(), self.autocast():
            out = self.decoder.model(input_ids=ids, use_cache=True)
        kv = [(layer[0], layer[1]) for layer in _cache_layers(out.past_key_values)]
        return kv, out.last_hidden_state

    def _run_groups(
        self,
        body: nn.Module,
        kv: KV,
        prefix_lens: torch.Tensor,
        embeds: torch.Tensor,
        want_pre_norm: bool = False,
    ) -> torch.Tensor:
        """Run `body` (a LlamaModel-like stack) over K groups of G input embeddings
        [B, K, G, H] attending to the cache as `group_mask` says; returns [B, K, G, H]."""
        from transformers import DynamicCache

        b, k, g, h = embeds.shape
        cache_len = kv[0][0].shape[2]
        mask = group_mask(prefix_lens, cache_len, g)
        # A fresh cache object per pass: HF appends the groups' keys to it in place.
        cache = DynamicCache(ddp_cache_data=kv, config=body.config)
        captured: list[torch.Tensor] = []
        hook = None
        if want_pre_norm:
            hook = body.norm.register_forward_hook(lambda m, i, o: captured.append(i[0]))
        try:
            out = body(
                inputs_embeds=embeds.reshape(b, k * g, h),
                attention_mask=self._attention_mask(mask),
                position_ids=group_positions(prefix_lens, g),
                past_key_values=cache,
                use_cache=True,
            )
        finally:
            if hook is not None:
                hook.remove()
        states = captured[0] if want_pre_norm else out.last_hidden_state
        return states.reshape(b, k, g, h)

    def inserted_at(
        self, kv: KV | None, ids: torch.Tensor, prefix_lens: torch.Tensor
    ) -> torch.Tensor:
        """The vectors the decoder sees at positions `group_start(prefix_lens)` onwards for
        each prefix ids[b, :prefix_lens[b, k]]: [B, K, n_inserted, H]. Inserted: the latents
        and, with `replay_last_token`, the prefix's last token's embedding. Replacing the
        tail: the prefix's last N_L tokens' embeddings plus the latents."""
        lat = self.latents_at(kv, prefix_lens)
        if self.config.replaced_tokens:
            offsets = torch.arange(lat.shape[2], device=prefix_lens.device)
            tail = prefix_lens[:, :, None] - self.config.replaced_tokens + offsets
            tail_ids = torch.gather(ids, 1, tail.reshape(ids.shape[0], -1)).reshape(tail.shape)
            return self.embed(tail_ids).float() + lat
        if not self.config.replay_last_token:
            return lat
        last = self.embed(torch.gather(ids, 1, prefix_lens - 1)).float()
        return torch.cat([lat, last[:, :, None]], dim=2)

    def group_start(self, prefix_lens: torch.Tensor) -> torch.Tensor:
        """Where the vectors of `inserted_at` sit: right after the prefix, or on its tail.
        The decoder's group then attends to the cache before that position only."""
        return prefix_lens - self.config.replaced_tokens

    def latents_at(self, kv: KV | None, prefix_lens: torch.Tensor) -> torch.Tensor:
        """Latents [B, K, N_L, H] for K positions per sequence (fp32, in input-embedding space);
        pause latents need no cache."""
        b, k = prefix_lens.shape
        n = self.config.n_latents
        base = self.base[None, None].expand(b, k, n, self.hidden_size)
        if self.config.method == "pause":
            return base
        assert kv is not None, "the coprocessor reads the prefix's cache"
        soft = self.soft_tokens[None, None].expand(b, k, n, self.hidden_size)
        body = self.full_copy.model if self.full_copy is not None else self.decoder.model
        with self.autocast():
            states = self._run_groups(
                body,
                kv,
                prefix_lens,
                soft.to(self._embed_dtype()),
                want_pre_norm=self.config.hidden_source == "pre_norm",
            )
        states = states.float()
        states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.config.output == "residual":
            return base + self.proj(states) / self.hidden_size
        return self.proj(states)

    def _embed_dtype(self) -> torch.dtype:
        return self.decoder.get_input_embeddings().weight.dtype

    def decode_groups(
        self, kv: KV, prefix_lens: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        """Frozen decoder over K groups of input embeddings [B, K, G, H] after their prefixes;
        returns the final hidden states [B, K, G, H]."""
        with self.decoder_role(), self.autocast():
            return self._run_groups(self.decoder.model, kv, prefix_lens, embeds)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """The LM head over states [..., H]. Flattened to 2-D first: on a 4-D input the CPU
        linear broadcasts the 49k x H weight through a batched matmul and copies it (measured:
        240 ms of a 370 ms check pass)."""
        flat = states.reshape(-1, states.shape[-1])
        with self.autocast():
            return self.decoder.lm_head(flat).float().reshape(*states.shape[:-1], -1)

    # --- the loss -----------------------------------------------------------------------

    def packed_nll(
        self,
        ids: torch.Tensor,
        prefix_lens: torch.Tensor,
        n_ahead: int,
        *,
        latents: bool = True,
        prefix: tuple[KV, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL [B, K, n_ahead] of the n_ahead tokens after each prefix
        ids[b, :prefix_lens[b, k]], with this model's latents inserted (latents=True), and the
        plain decoder's NLL [B, K, n_ahead] from the same prefix pass (no grad). `prefix` is
        that pass if already run (it is the same for every model sharing the decoder)."""
        targets, plain, augmented = self._packed_logits(ids, prefix_lens, n_ahead, latents, prefix)
        base_nll = _nll(plain, targets)
        return (base_nll if augmented is None else _nll(augmented, targets)), base_nll

    def packed_nll_and_kl(
        self, ids: torch.Tensor, prefix_lens: torch.Tensor, n_ahead: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`packed_nll` with latents, plus the do-no-harm term: KL(plain || augmented) [B, K,
        n_ahead] of the next-token distributions at the same ahead positions, which is 0 only
        where the latents leave the plain decoder's prediction as it was."""
        targets, plain, augmented = self._packed_logits(ids, prefix_lens, n_ahead, True, None)
        assert augmented is not None
        kl = F.kl_div(
            F.log_softmax(augmented, -1),
            F.log_softmax(plain, -1),
            log_target=True,
            reduction="none",
        )
        return _nll(augmented, targets), _nll(plain, targets), kl.sum(-1)

    def _packed_logits(
        self,
        ids: torch.Tensor,
        prefix_lens: torch.Tensor,
        n_ahead: int,
        latents: bool,
        prefix: tuple[KV, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Targets [B, K, A], the plain decoder's logits for them and, if `latents`, the
        augmented decoder's (each [B, K, A, V])."""
        kv, last_hidden = prefix if prefix is not None else self.prefix_pass(ids)
        targets, plain = self._plain_ahead_logits(ids, last_hidden, prefix_lens, n_ahead)
        if not latents:
            return targets, plain, None
        lat = self.inserted_at(kv, ids, prefix_lens)  # [B, K, n_inserted, H]
        return targets, plain, self._logits_after_latents(kv, prefix_lens, lat, targets)

    @torch.no_grad()
    def _plain_ahead_logits(
        self, ids: torch.Tensor, last_hidden: torch.Tensor, prefix_lens: torch.Tensor, n_ahead: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The n_ahead target ids [B, K, n_ahead] after each prefix, and the plain decoder's
        logits [B, K, n_ahead, V] for them, read off the prefix pass: it predicts ids[p+j] from
        position p+j-1."""
        b, k = prefix_lens.shape
        ahead_idx = prefix_lens[:, :, None] + torch.arange(n_ahead, device=ids.device)
        targets = torch.gather(ids, 1, ahead_idx.reshape(b, -1)).reshape(b, k, n_ahead)
        src = (ahead_idx - 1).reshape(b, -1)
        h = torch.gather(last_hidden, 1, src[:, :, None].expand(-1, -1, last_hidden.shape[-1]))
        return targets, self.logits(h.reshape(b, k, n_ahead, -1))

    def _logits_after_latents(
        self, kv: KV, prefix_lens: torch.Tensor, lat: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, K, A, V] for the targets after each prefix with the inserted vectors
        [B, K, N, H] between."""
        n = lat.shape[2]
        ahead_in = self.embed(targets[:, :, :-1])  # the ahead tokens fed back, except the last
        with self.autocast():
            embeds = torch.cat([lat.to(ahead_in.dtype), ahead_in], dim=2)
        states = self.decode_groups(kv, self.group_start(prefix_lens), embeds)
        # The last inserted vector's output predicts ahead token 1; ahead token j's, j+1.
        return self.logits(states[:, :, n - 1 :])

    @torch.no_grad()
    def latents_and_check(
        self,
        ids: torch.Tensor,
        lens: torch.Tensor,
        points: torch.Tensor,
        n_check: int,
        between: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving vectors [B, n_inserted, H] after each row's ids[b, :lens[b]], and the value
        check (`check_deltas`) at the earlier points [B, J] of the same row. One prefix pass, one
        coprocessor pass over all 1 + J groups of soft tokens, one decoder pass for the check."""
        prefix = self.prefix_pass(ids)
        lat = self.inserted_at(prefix[0], ids, torch.cat([lens[:, None], points], dim=1))
        return lat[:, 0], self._check_deltas(prefix, ids, points, lat[:, 1:], n_check, between)

    @torch.no_grad()
    def check_deltas(
        self,
        prefix: tuple[KV, torch.Tensor],
        ids: torch.Tensor,
        points: torch.Tensor,
        n_check: int,
        between: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The value check on a prefix pass already run: the NLL change [B, J, n_check] (with
        latents minus without) of the n_check tokens after each point points[b, j] of ids[b],
        with the prompt-like token ids `between` [S] after the point in both runs, if given."""
        lat = self.inserted_at(prefix[0], ids, points)
        return self._check_deltas(prefix, ids, points, lat, n_check, between)

    def _check_deltas(
        self,
        prefix: tuple[KV, torch.Tensor],
        ids: torch.Tensor,
        points: torch.Tensor,
        lat: torch.Tensor,
        n_check: int,
        between: torch.Tensor | None,
    ) -> torch.Tensor:
        kv, last_hidden = prefix
        targets, plain = self._plain_ahead_logits(ids, last_hidden, points, n_check)
        if between is None or between.numel() == 0:
            with_latents = self._logits_after_latents(kv, points, lat, targets)
            return _nll(with_latents, targets) - _nll(plain, targets)
        # With a prompt between, the plain run needs its own pass: both run as 2J groups of
        # one decoder pass, the plain ones right-padded by N_L (causal: the padding is unseen).
        b, j = points.shape
        n, s = lat.shape[2], between.numel()
        tail_in = self.embed(targets[:, :, :-1])
        prompt = self.embed(between.to(ids.device))[None, None].expand(b, j, s, -1)
        plain_in = torch.cat([prompt, tail_in], dim=2)
        with self.autocast():
            augmented_in = torch.cat([lat.to(plain_in.dtype), plain_in], dim=2)
        padded = F.pad(plain_in, (0, 0, 0, n))
        starts = torch.cat([self.group_start(points), points], dim=1)
        states = self.decode_groups(kv, starts, torch.cat([augmented_in, padded], dim=1))
        with_latents = self.logits(states[:, :j, n + s - 1 : n + s - 1 + n_check])
        without = self.logits(states[:, j:, s - 1 : s - 1 + n_check])
        return _nll(with_latents, targets) - _nll(without, targets)

    def naive_nll(self, ids: torch.Tensor, prefix_lens: torch.Tensor, n_ahead: int) -> torch.Tensor:
        """The reference loop: each (sequence, position) on its own, HF's own causal masking,
        a fresh prefix pass per pass. Same result as `packed_nll`, K*B times the passes."""
        from transformers import DynamicCache

        b, k = prefix_lens.shape
        rows = []
        for bi in range(b):
            for ki in range(k):
                p = int(prefix_lens[bi, ki])
                prefix = ids[bi : bi + 1, :p]
                targets = ids[bi, p : p + n_ahead]

                def fresh_cache(prefix: torch.Tensor = prefix) -> DynamicCache:
                    with torch.no_grad(), self.decoder_role(), self.autocast():
                        return self.decoder.model(input_ids=prefix, use_cache=True).past_key_values

                if self.config.method == "pause":
                    lat = self.base
                else:
                    body = (
                        self.full_copy.model if self.full_copy is not None else self.decoder.model
                    )
                    pos = torch.arange(p, p + self.config.n_latents)[None]
                    cache = fresh_cache()  # before the hook: this pass runs the same norm
                    captured: list[torch.Tensor] = []
                    hook = None
                    if self.config.hidden_source == "pre_norm":
                        hook = body.norm.register_forward_hook(
                            lambda m, i, o, c=captured: c.append(i[0])
                        )
                    with self.autocast():
                        o = body(
                            inputs_embeds=self.soft_tokens[None].to(self._embed_dtype()),
                            position_ids=pos,
                            past_key_values=cache,
                            use_cache=True,
                        )
                    if hook is not None:
                        hook.remove()
                    s = (captured[0] if captured else o.last_hidden_state)[0].float()
                    s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
                    lat = self.proj(s)
                    if self.config.output == "residual":
                        lat = self.base + lat / self.hidden_size
                start = p
                if self.config.replay_last_token:
                    lat = torch.cat([lat, self.embed(prefix[0, -1:]).float()])
                if self.config.replaced_tokens:
                    start = p - self.config.replaced_tokens
                    lat = self.embed(prefix[0, start:]).float() + lat
                ahead_in = self.embed(targets[None, :-1])[0]
                embeds = torch.cat([lat.to(ahead_in.dtype), ahead_in])[None]
                pos = torch.arange(start, start + embeds.shape[1])[None]
                with self.decoder_role(), self.autocast():
                    o = self.decoder.model(
                        inputs_embeds=embeds,
                        position_ids=pos,
                        past_key_values=fresh_cache(prefix[:, :start]),
                        use_cache=True,
                    )
                rows.append(_nll(self.logits(o.last_hidden_state[0, len(lat) - 1 :]), targets))
        return torch.stack(rows).reshape(b, k, n_ahead)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
    )
    return flat.reshape(targets.shape)


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]


def load_decoder(decoder_dir: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = Path(decoder_dir) / "config.json"
    model_type = json.loads(config_path.read_text()).get("model_type", "")
    # Gemma-2's soft-capping needs eager attention; the rest run SDPA with a boolean 4D mask.
    attn = "eager" if model_type.startswith("gemma2") else "sdpa"
    decoder = AutoModelForCausalLM.from_pretrained(
        decoder_dir, dtype=dtype, attn_implementation=attn
    )
    decoder.eval()
    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    return decoder, tokenizer


def build_model(
    decoder: nn.Module, tokenizer: Any, config: CoprocessorConfig, compute_dtype: torch.dtype
) -> CoprocessorModel:
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"] if tokenizer else []
    model = CoprocessorModel(decoder, config, torch.tensor(ids, dtype=torch.long))
    model.compute_dtype = compute_dtype
    model.eval()  # no dropout anywhere; train/eval only differ in grad
    return model
