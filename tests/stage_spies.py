"""Spies for one training stage run in a test: the loop it reports to, and what it regresses on."""

from __future__ import annotations

import torch


class RecordingLoop:
    """A StageLoop stand-in: starts at step 0, keeps the optimizer, the buffers and every step's losses."""

    seed = 0

    def __init__(self):
        self.optimizer, self.buffers, self.steps, self.loss_shapes, self.losses = None, [], [], [], []

    def resume(self, params, optimizer, buffers=None):
        self.optimizer = optimizer
        self.buffers.append(buffers)
        return 0

    def step_done(self, step, **losses):
        self.steps.append(step)
        self.loss_shapes.append({k: tuple(v.shape) for k, v in losses.items()})
        self.losses.append({k: float(v.detach()) for k, v in losses.items()})


def record_training(monkeypatch, stage_module) -> tuple[list, list, list]:
    """(draws, draw_args, regressions): each partial-denoise draw (latents_k, t) and its arguments after
    (models, embeds), and each MSE's (prediction, target), as `stage_module` computes them."""
    draws, draw_args, regressions = [], [], []
    draw = stage_module.draw_training_latent
    monkeypatch.setattr(stage_module, "draw_training_latent",
                        lambda *a, **k: draw_args.append(a[2:]) or draws.append(draw(*a, **k)) or draws[-1])
    mse = torch.nn.functional.mse_loss
    monkeypatch.setattr(torch.nn.functional, "mse_loss",
                        lambda pred, target: regressions.append((pred.detach(), target)) or mse(pred, target))
    return draws, draw_args, regressions


def unet_eps(pipe, latents, t, prompts) -> dict:
    """prompt -> the pipeline's UNet prediction, computed straight through diffusers, not through EraseModels."""
    with torch.no_grad():
        out = {}
        for prompt in prompts:
            ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
            out[prompt] = pipe.unet(latents, torch.tensor(t), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        return out
