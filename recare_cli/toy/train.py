"""`recare toy train`: train the toy world's models from seeds and pack them for shipping.

Stages, each saved under the work directory as it finishes so an interrupted run continues:
dataset → VAE → text encoder + UNet → ground-truth classifier → toy CLIP → pack. The result is
`toy.json` (the config, how the training went) and `toy.safetensors`
(every weight in float16; token-embedding tables keep only the rows the captions train, since the
other 49,000-odd rows of the CLIP vocabulary never receive a gradient).
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recare_cli.fsutil import atomic_path, write_safetensors, write_json
from recare_cli.manifest import Writer, claim
from recare_cli.output import QUIET_REPORTER, Reporter
from recare_cli.toy import world
from recare_cli.toy.config import TOY_CONFIG
from recare_cli.toy.package import TOY_JSON, TOY_WEIGHTS, build_vae, pack_rows, text_embedding_key, write_word_list

CLIP_EMBEDDING = "clip.token_embedding.weight"


def scaled_config(fraction: float) -> dict:
    """TOY_CONFIG with every step count and the dataset scaled (a smoke run for tests uses ~0.001)."""
    config = copy.deepcopy(TOY_CONFIG)
    if fraction != 1.0:
        config["dataset"]["size"] = max(64, int(config["dataset"]["size"] * fraction))
        for part in ("vae", "unet", "clip", "classifier"):
            train = config[part]["train"]
            train["steps"] = max(2, int(train["steps"] * fraction))
            train["warmup"] = min(train.get("warmup", 0), train["steps"] // 2)
            if "decay" in train:
                train["decay"] = max(1, int(train["decay"] * fraction))
    return config


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] → float [n, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _batches(n: int, batch_size: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield torch.from_numpy(rng.integers(0, n, size=batch_size))


def _lr_at(step: int, settings: dict) -> float:
    """Linear warm-up, constant, then a cosine down to zero over the last `decay` steps."""
    lr, warmup, decay, steps = settings["lr"], settings.get("warmup", 0), settings.get("decay", 0), settings["steps"]
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if decay and step >= steps - decay:
        return lr * 0.5 * (1 + np.cos(np.pi * (step - (steps - decay)) / decay))
    return lr


# stages ------------------------------------------------------------------------------------------

def train_vae(images: np.ndarray, config: dict, reporter: Reporter) -> tuple[dict, float]:
    from diffusers import AutoencoderKL

    settings = config["vae"]["train"]
    torch.manual_seed(config["seed"])
    vae = AutoencoderKL(**config["vae"]["model"])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings["lr"])
    pixels = _to_unit(images)
    with reporter.progress("toy VAE", total=settings["steps"]) as task:
        for idx in _batches(len(pixels), settings["batch_size"], settings["steps"], config["seed"]):
            x = pixels[idx]
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            mse = F.mse_loss(reconstruction, x)
            loss = mse + settings["kl_weight"] * posterior.kl().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            task.advance(1, mse=mse.item())
    return vae.state_dict(), mse.item()


@torch.no_grad()
def encode_dataset(vae, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        dist = vae.encode(_to_unit(images[start:start + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(latent_mean: torch.Tensor, latent_std: torch.Tensor, caption_ids: torch.Tensor, empty_ids: torch.Tensor,
               config: dict, reporter: Reporter) -> tuple[dict, dict, float]:
    """Text encoder and UNet together, epsilon prediction, SD's noise schedule."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    settings = config["unet"]["train"]
    torch.manual_seed(config["seed"] + 1)
    unet = UNet2DConditionModel(**config["unet"]["model"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
    scheduler_config = config["scheduler"]
    noise_scheduler = DDPMScheduler(num_train_timesteps=scheduler_config["num_train_timesteps"],
                                    beta_start=scheduler_config["beta_start"], beta_end=scheduler_config["beta_end"],
                                    beta_schedule=scheduler_config["beta_schedule"])
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings["lr"])
    generator = torch.Generator().manual_seed(config["seed"] + 2)
    with reporter.progress("toy UNet + text encoder", total=settings["steps"]) as task:
        for step, idx in enumerate(_batches(len(caption_ids), settings["batch_size"], settings["steps"], config["seed"] + 3)):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, settings)
            latents = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator))
            latents = latents * config["vae"]["scaling_factor"]
            ids = caption_ids[idx].clone()
            dropped = torch.rand(len(idx), generator=generator) < settings["caption_dropout"]
            ids[dropped] = empty_ids
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            hidden_states = text_encoder(ids)[0]
            eps_pred = unet(noisy_latents, timesteps, encoder_hidden_states=hidden_states).sample
            loss = F.mse_loss(eps_pred, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            task.advance(1, loss=loss.item())
    return unet.state_dict(), text_encoder.state_dict(), loss.item()


def train_classifier(images: np.ndarray, reconstructions: np.ndarray, labels: dict, config: dict,
                     reporter: Reporter) -> tuple[dict, float]:
    """Half of each batch is VAE reconstructions: generated images look like those, not like renders."""
    from recare_cli.toy.classifier import HEADS, ToyClassifier

    settings = config["classifier"]["train"]
    torch.manual_seed(config["seed"] + 4)
    classifier = ToyClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=settings["lr"])
    originals, recons = _to_unit(images), _to_unit(reconstructions)
    targets = {name: torch.from_numpy(labels[name]) for name in HEADS}
    half = settings["batch_size"] // 2
    with reporter.progress("toy classifier", total=settings["steps"]) as task:
        for idx in _batches(len(originals), settings["batch_size"], settings["steps"], config["seed"] + 5):
            idx_recon = idx[:half] % len(recons)
            x = torch.cat([originals[idx[half:]], recons[idx_recon]])
            logits = classifier(x)
            loss = sum(F.cross_entropy(logits[name], torch.cat([targets[name][idx[half:]], targets[name][idx_recon]]))
                       for name in HEADS)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            task.advance(1, loss=loss.item())
    return classifier.state_dict(), loss.item()


def train_clip(images: np.ndarray, captions: list[str], config: dict, workdir: Path,
               reporter: Reporter) -> tuple[dict, float]:
    """Contrastive training of a small open_clip model on the captioned scenes (empty captions skipped)."""
    import open_clip

    from recare_cli.clip import LOCAL_DIR, OPEN_CLIP_CONFIG, quiet_open_clip

    settings = config["clip"]["train"]
    folder = workdir / "clip-config"
    write_json(folder / OPEN_CLIP_CONFIG, {"model_cfg": config["clip"]["model_cfg"],
                                           "preprocess_cfg": config["clip"]["preprocess_cfg"]})
    torch.manual_seed(config["seed"] + 6)
    with quiet_open_clip():
        model = open_clip.create_model(f"{LOCAL_DIR}{folder}", pretrained=None)
        tokenizer = open_clip.get_tokenizer(f"{LOCAL_DIR}{folder}")
    keep = [i for i, c in enumerate(captions) if c]
    text_tokens = tokenizer([captions[i] for i in keep])
    mean = torch.tensor(config["clip"]["preprocess_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["clip"]["preprocess_cfg"]["std"]).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(images[keep]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    model.train()
    with reporter.progress("toy CLIP", total=settings["steps"]) as task:
        for idx in _batches(len(keep), settings["batch_size"], settings["steps"], config["seed"] + 7):
            image_features = F.normalize(model.encode_image(pixels[idx]), dim=-1)
            text_features = F.normalize(model.encode_text(text_tokens[idx]), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.T
            # Captions repeat ("a star"): treat every identical caption in the batch as a positive.
            same = (text_tokens[idx][:, None, :] == text_tokens[idx][None, :, :]).all(-1).float()
            targets = same / same.sum(dim=1, keepdim=True)
            loss = (torch.sum(-targets * logits.log_softmax(dim=1), dim=1).mean()
                    + torch.sum(-targets * logits.T.log_softmax(dim=1), dim=1).mean()) / 2
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            task.advance(1, loss=loss.item())
    return model.state_dict(), loss.item()


# packing -------------------------------------------------------------------------------------------

def trained_token_ids(caption_ids: torch.Tensor) -> torch.Tensor:
    """The rows of the token-embedding tables that training touched: the tokens of the captions."""
    return caption_ids.unique().sort().values


# the whole run -----------------------------------------------------------------------------------

def train_toy_world(workdir: Path, output: Path, fraction: float = 1.0, reporter: Reporter = QUIET_REPORTER) -> dict:
    """Run (or continue) every stage under `workdir`; write toy.json + toy.safetensors to `output`."""
    from recare_cli.clipvocab import build_tokenizer
    from recare_cli.models import library_versions

    claim(output, Writer("toy train"), flag="--output")
    config = scaled_config(fraction)
    workdir.mkdir(parents=True, exist_ok=True)
    times_path = workdir / "times.json"
    record = json.loads(times_path.read_text()) if times_path.is_file() else {}

    def stage(name: str, path: Path, run) -> dict:
        if path.is_file():
            reporter.event("stage_skipped", stage=name, path=str(path))
            return _load(path)
        reporter.event("stage_start", stage=name)
        start = time.perf_counter()
        tensors, final_loss = run()
        write_safetensors(path, tensors)
        record[name] = {"seconds": round(time.perf_counter() - start, 1), "final_loss": round(final_loss, 5)}
        write_json(times_path, record)
        reporter.event("stage_end", stage=name, **record[name])
        return tensors

    data_path = workdir / "dataset.npz"
    if not data_path.is_file():
        images, captions, labels = world.make_dataset(config["dataset"]["size"], config["dataset"]["seed"])
        with atomic_path(data_path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, images=images, captions=np.asarray(captions), **labels)
    data = np.load(data_path)
    images, captions = data["images"], [str(c) for c in data["captions"]]
    labels = {k: data[k] for k in ("shape", "colour", "background", "style")}

    vae_state = stage("vae", workdir / "vae.safetensors", lambda: train_vae(images, config, reporter))
    vae = build_vae(config, vae_state)
    latent_mean, latent_std = encode_dataset(vae, images)

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer = build_tokenizer(Path(tokenizer_dir), config["text_encoder"]["max_position_embeddings"])
    caption_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]

    def run_unet():
        unet_state, text_state, loss = train_unet(latent_mean, latent_std, caption_ids, empty_ids, config, reporter)
        return {**{f"unet.{k}": v for k, v in unet_state.items()},
                **{f"text_encoder.{k}": v for k, v in text_state.items()}}, loss

    denoiser = stage("unet", workdir / "unet.safetensors", run_unet)

    def run_classifier():
        n = min(len(images), 4096)
        with torch.no_grad():
            recon = torch.cat([vae.decode(latent_mean[s:s + 256]).sample for s in range(0, n, 256)])
        reconstructions = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return train_classifier(images, reconstructions, labels, config, reporter)

    classifier_state = stage("classifier", workdir / "classifier.safetensors", run_classifier)
    clip_state = stage("clip", workdir / "clip.safetensors",
                       lambda: train_clip(images, captions, config, workdir, reporter))

    weights = {**{f"vae.{k}": v for k, v in vae_state.items()}, **denoiser,
               **{f"classifier.{k}": v for k, v in classifier_state.items()},
               **{f"clip.{k}": v for k, v in clip_state.items()}}
    weights = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in weights.items()}
    rows = trained_token_ids(caption_ids)
    pack_rows(weights, text_embedding_key(weights), rows)
    pack_rows(weights, CLIP_EMBEDDING, rows)
    manifest = {
        "config": config,
        "training": record,
        "fraction": fraction,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "libraries": library_versions(),
    }
    output.mkdir(parents=True, exist_ok=True)
    write_safetensors(output / TOY_WEIGHTS, weights, metadata={"format": "recare-toy-1"})
    write_word_list(output / "words.txt")
    write_json(output / TOY_JSON, manifest)  # last: a toy.json on disk means a complete model
    return manifest
