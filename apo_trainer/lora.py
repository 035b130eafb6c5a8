"""LoRA rounds: a fresh PEFT adapter on the frozen theta_t, merged exactly into theta_hat_{t+1}.

PEFT trains the adapter; the merge is ours: ``W + s * B @ A`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)``
with rsLoRA), summed in float64 and rounded once into the checkpoint dtype, so theta_hat_{t+1} is the correctly
rounded base + delta (PEFT's merge_and_unload sums in the weights' own dtype). The extrapolation then runs between
the merged full checkpoints as in a full fine-tuning round.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from apo_trainer.errors import ConfigError
from apo_trainer.store import dumps

ADAPTER = "default"


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(
            "config: peft (LoRA rounds) needs the peft package; pip install 'apo-merge[peft]' or drop the peft group",
            exit_code=1,
        ) from None


def scaling(peft_cfg: dict[str, Any]) -> float:
    r = peft_cfg["r"]
    return peft_cfg["lora_alpha"] / (math.sqrt(r) if peft_cfg["use_rslora"] else r)


def _is_linear(m: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's Linear, weight stored (in, out)

    return isinstance(m, (torch.nn.Linear, Conv1D))


def linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if _is_linear(m)]


def check_targets(model: torch.nn.Module, targets: str | list[str], where: str) -> None:
    """Every named target must be the last part(s) of some Linear module's name (PEFT's list matching)."""
    if targets == "all-linear":
        return
    linear = linear_names(model)
    names = [name for name, _ in model.named_modules()]
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            known = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise ConfigError(
                f"config: peft.target_modules names '{t}', which {where} does not have; its Linear modules are "
                f"{', '.join(known)} (or use all-linear)"
            )
        if not all(n in linear for n in hits):
            raise ConfigError(
                f"config: peft.target_modules '{t}' is not a Linear layer in {where}; LoRA rounds target Linear "
                "layers only"
            )


def check_peft_config(cfg: Any) -> None:
    """Before any work: peft importable, and (for a local model folder) every target module exists."""
    require_peft()
    path = Path(cfg.model)
    if not (path / "config.json").is_file():
        return  # a Hub id: checked when the model is loaded for training
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    check_targets(model, cfg.peft["target_modules"], f"model {cfg.model}")


def wrap(model: torch.nn.Module, peft_cfg: dict[str, Any], where: str) -> torch.nn.Module:
    """``model`` frozen under a fresh LoRA adapter (PEFT's seeded init: A random, B zero)."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    check_targets(model, peft_cfg["target_modules"], where)
    config = LoraConfig(
        r=peft_cfg["r"],
        lora_alpha=peft_cfg["lora_alpha"],
        lora_dropout=peft_cfg["lora_dropout"],
        target_modules=peft_cfg["target_modules"],
        use_rslora=peft_cfg["use_rslora"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_layers(peft_model: torch.nn.Module) -> dict[str, Any]:
    """The adapter's LoRA layers by their name in the base model."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


@torch.no_grad()
def merged_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """``weight + s * B @ A`` (transposed for (in, out) weights) summed in float64, rounded once into ``weight``'s
    dtype."""
    delta = B.double() @ A.double()
    return (weight.double() + s * (delta.T if fan_in_fan_out else delta)).to(weight.dtype)


@torch.no_grad()
def merge_and_unload(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Merge the adapter into the base weights exactly (in place) and return the plain base model."""
    for module in lora_layers(peft_model).values():
        w = module.base_layer.weight
        A, B = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
        w.copy_(merged_weight(w, A, B, module.scaling[ADAPTER], bool(getattr(module, "fan_in_fan_out", False))))
    return peft_model.unload()


def canonical_config(path: Path) -> None:
    """Rewrite PEFT's adapter_config.json with sorted keys and module lists (PEFT keeps target_modules in a set,
    whose order changes with the interpreter's hash seed), so a rerun writes the same bytes."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(dumps(config, path, indent=2, sort_keys=True) + "\n", encoding="utf-8")  # strict JSON
