"""Fine-tuning modes: which parameters train, frozen BatchNorm in eval mode, LoRA adapters.

    full          every parameter trains
    linear-probe  only the classifier head trains (a linear probe of frozen features)
    partial:K     backbone stages 0..K-1 are frozen, stages K.. and the head train
                  (partial:0 = full; partial:S = linear-probe for S stages); a fraction
                  0 < K < 1 means round(K·S) stages, the same depth for any architecture
    bitfit        biases, norm affine parameters and the head train (Ben Zaken et al. 2022)
    lora          LoRA adapters (Hu et al. 2022, via the ``peft`` library) on the backbone's
                  nn.Linear and ungrouped nn.Conv2d layers; base weights and norms frozen,
                  head trains

A BatchNorm layer whose parameters are all frozen keeps its running statistics: it is put
back in eval mode before every forward pass of a model in train mode, so ``model.train()``
from any caller (the loop, DDP) cannot turn it back on.
"""

from __future__ import annotations

from torch import Tensor, nn

from imgpipe.config.specs import Finetune, parse_finetune
from imgpipe.models.heads import HEAD, get_classifier, model_spec_of, parameter_stages
from imgpipe.models.state import unwrap_model

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
LORA_ADAPTER = "default"


def num_stages(model: nn.Module) -> int:
    """Backbone stages S of a registered model (``partial:K`` takes 0 <= K <= S)."""
    return len(model_spec_of(model).stages)


def _trainable(name: str, stage: int, ft: Finetune, bias_or_norm: bool) -> bool:
    if stage == HEAD or ft.mode == "full":
        return True
    if ft.mode == "partial":
        return stage >= ft.stage
    if ft.mode == "bitfit":
        return bias_or_norm
    return False  # linear-probe; lora (adapters are added trainable afterwards)


def _norm_param_names(model: nn.Module) -> set[str]:
    return {f"{mname}.{pname}" if mname else pname
            for mname, m in model.named_modules() if isinstance(m, NORM_TYPES)
            for pname, _ in m.named_parameters(recurse=False)}


def apply_finetune(model: nn.Module, finetune: Finetune | str, lora_rank: int = 8,
                   lora_alpha: float = 16.0) -> nn.Module:
    """Freeze (``requires_grad=False``) what ``finetune`` does not train, keep frozen BatchNorm
    layers in eval mode, and add LoRA adapters for ``lora``. Call before wrapping in DDP and
    before building the optimizer. Returns the model (the same object).

    Raises:
        ValueError: ``partial:K`` with K above the model's stage count; an unknown mode.
    """
    ft = parse_finetune(finetune) if isinstance(finetune, str) else finetune
    inner = unwrap_model(model)
    stages = num_stages(inner)
    if ft.mode == "partial":
        if ft.frozen_stages(stages) > stages:
            raise ValueError(f"finetune: partial:{ft.stage} but {inner.imgpipe_model} has "
                             f"{stages} stages (K from 0 = full to {stages} = linear-probe)")
        ft = Finetune("partial", ft.frozen_stages(stages))
    norm_params = _norm_param_names(inner)
    by_stage = parameter_stages(inner)
    for name, p in inner.named_parameters():
        bias_or_norm = name.endswith(".bias") or name in norm_params
        p.requires_grad_(_trainable(name, by_stage[name], ft, bias_or_norm))
    if ft.mode == "lora":
        _add_lora(inner, lora_rank, lora_alpha)
    inner.imgpipe_finetune = str(ft)
    _keep_frozen_norms_eval(inner)
    return model


def lora_target_modules(model: nn.Module) -> list[str]:
    """Backbone layers LoRA adapts: every ``nn.Linear`` and every ungrouped ``nn.Conv2d``
    except the head. Depthwise/grouped convs (MobileNet, EfficientNet, ConvNeXt) are left
    alone: peft needs the rank divisible by the groups and cannot merge grouped adapters."""
    head = model_spec_of(model).head
    return [name for name, m in unwrap_model(model).named_modules()
            if name != head and (isinstance(m, nn.Linear)
                                 or (isinstance(m, nn.Conv2d) and m.groups == 1))]


def _add_lora(model: nn.Module, rank: int, alpha: float) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_target_modules(model)
    if not targets:
        raise ValueError(f"finetune: lora finds no Linear/Conv2d layer in {model.imgpipe_model}")
    head_trainable = [p.requires_grad for p in get_classifier(model).parameters()]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                       lora_dropout=0.0, bias="none"), model,
                            adapter_name=LORA_ADAPTER)
    # peft marks only adapters trainable; the new head must train too.
    for p, trainable in zip(get_classifier(model).parameters(), head_trainable, strict=True):
        p.requires_grad_(trainable)


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in unwrap_model(model).named_parameters())


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain architecture's state dict: LoRA deltas merged into their base weights and
    peft's names undone, so checkpoints and bundles load into ``create_model`` strictly.
    Without adapters it is ``unwrap_model(model).state_dict()``."""
    inner = unwrap_model(model)
    state = inner.state_dict()
    if not has_lora(inner):
        return state
    from peft.tuners.lora import LoraLayer

    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for name, m in inner.named_modules():
        if isinstance(m, LoraLayer) and LORA_ADAPTER in m.lora_A:
            key = f"{name}.weight"
            out[key] = (out[key] + m.get_delta_weight(LORA_ADAPTER).to(out[key].dtype)).detach()
    return out


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers whose parameters are all frozen (kept in eval mode)."""
    return [m for m in unwrap_model(model).modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False))]


def _keep_frozen_norms_eval(model: nn.Module) -> None:
    old = getattr(model, "_imgpipe_norm_hook", None)
    if old is not None:
        old.remove()
    frozen = frozen_norms(model)
    if not frozen:
        model._imgpipe_norm_hook = None
        return

    def to_eval(module: nn.Module, args: tuple) -> None:
        if module.training:
            for m in frozen:
                m.training = False

    model._imgpipe_norm_hook = model.register_forward_pre_hook(to_eval)
