"""One worker on several GPUs: the resident model split by layers (``gpus_per_worker``).

The decoder's layers go in contiguous runs to the devices (layer ``i`` of ``L`` on
device ``i * k // L``), the embeddings and whatever else the decoder holds on the
first, its final norm on the last, the output head on the last (on the first when it
is tied to the embeddings: one tensor, one device). accelerate's ``AlignDevicesHook``
moves each module's inputs to its device; the decoder and the head hand their outputs
back on the device they were called from, so a caller (the scorer, lm-eval) sees one
device. Each candidate's tensors are merged on the device that holds them.
"""

from __future__ import annotations

import torch


def worker_devices(device: torch.device, gpus: int) -> list[torch.device]:
    """The devices of a worker that holds ``gpus`` GPUs (Ray shows it exactly those, as
    ``cuda:0`` ... ``cuda:{gpus-1}``); on the CPU the same device ``gpus`` times."""
    if device.type != "cuda" or gpus == 1:
        return [device] * gpus
    return [torch.device("cuda", i) for i in range(gpus)]


def layer_owners(model: torch.nn.Module, devices: list[torch.device]) -> dict[str, torch.device]:
    """The device of each module that the split places, by module name."""
    decoder = model.get_decoder()  # type: ignore[operator]
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    first, last = devices[0], devices[-1]
    owners: dict[str, torch.device] = {}
    layers = decoder.layers
    for i in range(len(layers)):
        owners[f"{prefix}.layers.{i}"] = devices[i * len(devices) // len(layers)]
    for name, _child in decoder.named_children():
        if name != "layers":
            owners[f"{prefix}.{name}"] = last if name == "norm" else first
    head = model.get_output_embeddings()  # type: ignore[operator]
    tied = head is not None and head.weight is model.get_input_embeddings().weight  # type: ignore[operator]
    for name, child in model.named_children():
        if child is not decoder:
            owners[name] = last if child is head and not tied else first
    return owners


def split_by_layers(model: torch.nn.Module, devices: list[torch.device]) -> torch.nn.Module:
    """Move ``model``'s modules to their devices and hook them (again after a module was
    replaced, as a vocabulary resize does: a module's hook is replaced, never stacked)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    skip = getattr(model, "_skip_keys_device_placement", None)  # the KV cache stays where each layer keeps it
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()  # type: ignore[operator]
    for name, device in layer_owners(model, devices).items():
        module = modules[name].to(device)
        back = module is head  # logits come back where the hidden states were
        add_hook_to_module(module, AlignDevicesHook(execution_device=device, io_same_device=back, skip_keys=skip))
    decoder = model.get_decoder()  # type: ignore[operator]
    add_hook_to_module(decoder, AlignDevicesHook(io_same_device=True, skip_keys=skip))
    return model
