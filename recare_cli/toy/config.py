"""Architectures and training settings of the toy world's models (shared/spec/toy-world-notes.md).

One dict, recorded in the shipped toy.json: `recare toy train` with it regenerates the shipped weights.
"""

from __future__ import annotations

TOY_CONFIG = {
    "seed": 0,
    "dataset": {"size": 20000, "seed": 1},
    "vae": {
        "model": {
            "block_out_channels": [16, 32, 64],
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 16,
            "in_channels": 3,
            "out_channels": 3,
            "sample_size": 32,
        },
        "train": {"steps": 1200, "batch_size": 32, "lr": 1e-3, "kl_weight": 1e-6},
        # 1 / std of the trained VAE's latents, measured once and then fixed, as SD fixes 0.18215:
        # the UNet is trained on latents times this value, so a retrain must not re-measure it.
        "scaling_factor": 0.9433026909828186,
    },
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    },
    "unet": {
        "model": {
            "block_out_channels": [64, 128],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
            "in_channels": 4,
            "out_channels": 4,
            "sample_size": 8,
        },
        # The last `decay` steps anneal the rate to zero: measured, 800 such steps after 3,000 at a constant
        # rate took the base model's squares from 50% to 78% of "a square" images and yellow from 62% to 100%.
        "train": {"steps": 4500, "batch_size": 32, "lr": 5e-4, "warmup": 100, "decay": 1500, "caption_dropout": 0.1,
                  "max_grad_norm": 1.0},
    },
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
    },
    "clip": {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "head_width": 32, "patch_size": 4},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
        },
        "preprocess_cfg": {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
        "train": {"steps": 1500, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.1},
    },
    "classifier": {"train": {"steps": 1000, "batch_size": 64, "lr": 2e-3}},
}
