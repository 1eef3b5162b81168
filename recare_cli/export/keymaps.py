"""diffusers -> original (LDM) state-dict keys of SD 1.x/2.x and SDXL: UNet, VAE, CLIP and OpenCLIP text encoders."""

from __future__ import annotations

import re

from recare_cli.errors import RecareError
from recare_cli.models import is_sdxl

# diffusers -> LDM names. The UNet's blocks are numbered differently in the two layouts: LDM counts
# `input_blocks` / `output_blocks` across levels (conv_in is input block 0; each level has
# layers_per_block resnets, plus a downsampler block on all but the last level), diffusers numbers
# levels and layers. Inside a block the names agree except for the ResNet's.
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
MID_BLOCK_PARTS = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
VAE_TOP_LEVEL = {"conv_norm_out": "norm_out"}  # the rest of encoder/decoder top level keeps its name
VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_MID_PARTS = {"resnets.0": "mid.block_1", "attentions.0": "mid.attn_1", "resnets.1": "mid.block_2"}
OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "clip": "cond_stage_model.transformer.text_model.", "open_clip": "cond_stage_model.model.",
              # SDXL: CLIP-L and OpenCLIP-bigG side by side in the "conditioner"
              "sdxl_clip": "conditioner.embedders.0.transformer.text_model.", "sdxl_open_clip": "conditioner.embedders.1.model."}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _rename_part(rest: str, parts: dict[str, str]) -> str:
    """Rename the leading module path of `rest` (e.g. 'conv1.weight') by the first matching entry."""
    for old, new in parts.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    module, param = _split_param(key)
    if module in UNET_TOP_LEVEL:
        return f"{UNET_TOP_LEVEL[module]}.{param}"
    per_level = layers_per_block + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = 1 + level * per_level + layer
        return f"input_blocks.{block}.0.{_rename_part(rest, RESNET_PARTS)}" if kind == "resnets" \
            else f"input_blocks.{block}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{1 + int(match[1]) * per_level + layers_per_block}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.((?:resnets|attentions)\.\d+)\.(.+)", key):
        if match[1] not in MID_BLOCK_PARTS:
            raise _no_ldm_name(key)
        rest = _rename_part(match[2], RESNET_PARTS) if match[1].startswith("resnets") else match[2]
        return f"{MID_BLOCK_PARTS[match[1]]}.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = level * per_level + layer
        return f"output_blocks.{block}.0.{_rename_part(rest, RESNET_PARTS)}" if kind == "resnets" \
            else f"output_blocks.{block}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        level = int(match[1])
        # The upsampler follows the block's last resnet, and its attention when the level has one.
        position = 2 if level in up_blocks_with_attention else 1
        return f"output_blocks.{level * per_level + layers_per_block}.{position}.conv.{match[2]}"
    raise _no_ldm_name(key)


def _no_ldm_name(key: str) -> RecareError:
    return RecareError(
        f"single-file export supports Stable Diffusion 1.x/2.x and SDXL models; UNet weight '{key}' has no original-layout name",
        hint="use --format diffusers or --format unet for this model",
    )


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    if not isinstance(layers_per_block, int):
        raise RecareError("single-file export needs the same layers_per_block on every UNet level",
                          hint="use --format diffusers or --format unet for this model")
    with_attention = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return {unet_key_to_ldm(k, layers_per_block, with_attention): v for k, v in state.items()}


def vae_key_to_ldm(key: str, num_levels: int):
    """(LDM key, whether the weight is a linear layer the LDM VAE holds as a 1x1 conv)."""
    half, _, rest = key.partition(".")  # encoder | decoder | quant_conv | post_quant_conv
    if half not in ("encoder", "decoder"):
        return key, False
    module, param = _split_param(rest)
    if module in VAE_TOP_LEVEL:
        return f"{half}.{VAE_TOP_LEVEL[module]}.{param}", False
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        # LDM numbers decoder levels from the lowest resolution up, diffusers in decoding order.
        level = int(match[2]) if match[1] == "down" else num_levels - 1 - int(match[2])
        return f"{half}.{match[1]}.{level}.block.{match[3]}.{_rename_part(match[4], VAE_RESNET_PARTS)}", False
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(\w+)", rest):
        level = int(match[2]) if match[1] == "down" else num_levels - 1 - int(match[2])
        return f"{half}.{match[1]}.{level}.{match[3][:-2]}.conv.{match[4]}", False
    if match := re.fullmatch(r"mid_block\.(resnets\.\d+|attentions\.0)\.(.+)", rest):
        if match[1] not in VAE_MID_PARTS:
            raise _no_ldm_name(key)
        if match[1].startswith("resnets"):
            return f"{half}.{VAE_MID_PARTS[match[1]]}.{_rename_part(match[2], VAE_RESNET_PARTS)}", False
        renamed = _rename_part(match[2], VAE_ATTENTION_PARTS)
        return f"{half}.mid.attn_1.{renamed}", not renamed.startswith("norm.") and renamed.endswith(".weight")
    if module in ("conv_in", "conv_out"):
        return key, False
    raise _no_ldm_name(key)


def vae_to_ldm(state: dict, num_levels: int) -> dict:
    converted = {}
    for key, value in state.items():
        ldm_key, linear_as_conv = vae_key_to_ldm(key, num_levels)
        converted[ldm_key] = value[:, :, None, None] if linear_as_conv and value.ndim == 2 else value
    return converted


def _text_keys(state: dict) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel; older versions nest everything under text_model.
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def clip_to_ldm(state: dict, prefix: str = LDM_PREFIX["clip"]) -> dict:
    """SD 1.x (and SDXL's first encoder): OpenAI CLIP as transformers holds it, under `prefix`."""
    return {prefix + k: v for k, v in _text_keys(state).items()}


def open_clip_to_ldm(state: dict, prefix: str = LDM_PREFIX["open_clip"]) -> dict:
    """SD 2.x (and SDXL's second encoder): the OpenCLIP text tower, q/k/v fused into in_proj as open_clip stores them."""
    import torch

    state = _text_keys(state)
    converted = {}
    for key, value in state.items():
        if key == "text_projection.weight":  # SDXL's pooled projection: open_clip holds x @ P, not a Linear
            converted["text_projection"] = value.T.contiguous()
            continue
        if key in OPEN_CLIP_TOP_LEVEL:
            converted[OPEN_CLIP_TOP_LEVEL[key]] = value
            continue
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if match is None:
            raise _no_ldm_name(f"text_encoder.{key}")
        layer, rest = match[1], match[2]
        if projection := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            if projection[1] == "q":  # k and v are fused in along with q
                param = projection[2]
                fused = torch.cat([state[f"encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"])
                converted[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = fused
            continue
        converted[f"transformer.resblocks.{layer}.{_rename_part(rest, OPEN_CLIP_LAYER_PARTS)}"] = value
    return {prefix + k: v for k, v in converted.items()}


def text_encoder_layout(pipe) -> str:
    """'clip' (SD 1.x, OpenAI CLIP: quick_gelu), 'open_clip' (SD 2.x, OpenCLIP: gelu) or 'sdxl' (both)."""
    if is_sdxl(pipe):
        return "sdxl"
    text_encoder = pipe.text_encoder
    if type(text_encoder).__name__ != "CLIPTextModel":
        raise RecareError(f"single-file export supports SD 1.x/2.x text encoders, not {type(text_encoder).__name__}",
                          hint="use --format diffusers or --format unet for this model")
    return "clip" if text_encoder.config.hidden_act == "quick_gelu" else "open_clip"


def pipeline_to_ldm(pipe) -> dict:
    """One original-layout state dict (UNet, VAE, text encoder(s)) of an SD or SDXL pipeline."""
    layout = text_encoder_layout(pipe)
    text_state = pipe.text_encoder.state_dict()
    checkpoint = {LDM_PREFIX["unet"] + k: v
                  for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block).items()}
    checkpoint.update({LDM_PREFIX["vae"] + k: v
                       for k, v in vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types)).items()})
    if layout == "sdxl":
        checkpoint.update(clip_to_ldm(text_state, LDM_PREFIX["sdxl_clip"]))
        checkpoint.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), LDM_PREFIX["sdxl_open_clip"]))
    else:
        checkpoint.update(clip_to_ldm(text_state) if layout == "clip" else open_clip_to_ldm(text_state))
    return checkpoint
