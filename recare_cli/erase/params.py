"""Which UNet weights an erase stage trains (`--train-method`, recare-method.md §1)."""

from __future__ import annotations

from recare_cli.errors import UsageError

TRAIN_METHODS = ("noxattn", "xattn", "xattn-strict", "selfattn", "full")


def _wanted(module_name: str, train_method: str) -> bool:
    if train_method == "noxattn":
        return "attn2" not in module_name
    if train_method == "xattn":
        return "attn2" in module_name
    if train_method == "xattn-strict":
        # The reference asks for a name holding both `to_q` and `to_k`, which never matches, so it
        # trains nothing. We train what the name promises: the cross-attention key/value projections.
        return "attn2" in module_name and module_name.rsplit(".", 1)[-1] in ("to_k", "to_v")
    if train_method == "selfattn":
        return "attn1" in module_name
    return True  # full


def check_train_method(train_method: str) -> None:
    if train_method not in TRAIN_METHODS:
        raise UsageError(f"unknown --train-method '{train_method}'", hint=f"choose one of {', '.join(TRAIN_METHODS)}")


def trainable_parameter_names(unet, train_method: str) -> list[str]:
    """Parameter names (state-dict keys) of the nn.Linear / nn.Conv2d modules the method trains."""
    import torch.nn as nn

    check_train_method(train_method)
    names = []
    for module_name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and _wanted(module_name, train_method):
            names += [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return names


def select_trainable(unet, train_method: str) -> dict:
    """Freeze the whole UNet except the method's weights; return those weights by name."""
    names = set(trainable_parameter_names(unet, train_method))
    selected = {}
    for name, param in unet.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            selected[name] = param
    return selected
