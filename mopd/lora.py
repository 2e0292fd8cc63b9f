"""LoRA (`peft`) as an option of SFT, GRPO and distill (`lora:` in their sections; issue 24).

TRL's trainers take a ``peft_config`` and wrap the model; our own loop (distill, CoPD Phase II)
injects the adapters *in place* (``peft.inject_adapter_in_model``), so the module keeps its shape
(``model.model``, ``model.lm_head``: what `student_quantities` reads) and only the adapters train.
Either way a stage saves **merged** weights (:func:`plain_model`): every later stage, mergekit and a
user read a plain checkpoint of the base architecture, never an adapter folder.
"""

from __future__ import annotations

from mopd.settings.base import LoraParams


def peft_config(params: LoraParams):
    """The ``LoraConfig`` of a section's ``lora`` settings (causal LM, no bias)."""
    from peft import LoraConfig

    return LoraConfig(r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout,
                      target_modules=params.target_modules, bias="none", task_type="CAUSAL_LM")


def add_lora(model, params: LoraParams):
    """Inject LoRA adapters into ``model`` in place; only they stay trainable."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(peft_config(params), model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def has_lora(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def plain_model(model, copy: bool = False):
    """``model`` with every adapter merged into its base weights and removed (a ``PeftModel``
    from TRL, or adapters injected in place); a model without adapters is returned as it is.
    ``copy``: merge a copy and leave ``model`` (still training) as it is."""
    import copy as _copy

    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if copy and (isinstance(model, PeftModel) or has_lora(model)):
        model = _copy.deepcopy(model)
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    if not has_lora(model):
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad = True
    return model
