"""Format `tokens`: the learned adversarial tokens as textual-inversion embeddings (SD and SDXL layouts)."""

from __future__ import annotations

import re
from pathlib import Path

from recare_cli.errors import RecareError, UsageError
from recare_cli.export.check import TOLERANCE, _torch_dtype, max_abs_diff
from recare_cli.export.diffusers_folder import write_model_card
from recare_cli.export.settings import FILE_SUFFIX, ExportResult
from recare_cli.export.writing import _metadata


def _export_tokens(pipe, ref, source, settings, staged: Path, reporter) -> ExportResult:
    from safetensors.torch import save_file

    from recare_cli.learned_tokens import SDXL_TOKEN_KEYS, read_learned_tokens, text_encoder_pairs

    pairs = text_encoder_pairs(pipe)
    widths = [encoder.get_input_embeddings().weight.shape[1] for encoder, _ in pairs]
    embeddings = read_learned_tokens(source.tokens_path)  # token -> [row per text encoder]
    for token, rows in embeddings.items():
        if [row.shape[-1] for row in rows] != widths:
            raise RecareError(
                f"token '{token}' has {'+'.join(str(r.shape[-1]) for r in rows)} dimensions, "
                f"the base model's text encoder(s) {'+'.join(map(str, widths))}",
                hint="the tokens were learned on another base model; pass that one with --model",
            )
    single = Path(settings.output).suffix == FILE_SUFFIX
    if single and len(embeddings) > 1:
        raise UsageError(f"the run learned {len(embeddings)} tokens ({', '.join(embeddings)}); one file holds one",
                         hint="give --output a folder name (one .safetensors per token)")
    if not single:
        staged.mkdir()
    # Token names become file names: keep them portable (learned names are already plain).
    files = {token: staged if single else staged / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', token)}{FILE_SUFFIX}"
             for token in embeddings}
    written = {}  # token -> [row per text encoder], as stored
    for token, rows in embeddings.items():
        written[token] = [row.to(_torch_dtype(settings.dtype)).contiguous() for row in rows]
        # SD: {token: vector}, what load_textual_inversion reads; SDXL: clip_l/clip_g, as A1111 and ComfyUI read it
        tensors = ({token: written[token][0]} if len(pairs) == 1
                   else {key: row.reshape(1, -1) for key, row in zip(SDXL_TOKEN_KEYS, written[token])})
        save_file(tensors, str(files[token]), metadata=_metadata(source, ref, settings, token=token))

    try:
        if len(pairs) == 1:
            pipe.load_textual_inversion([str(f) for f in files.values()])
        else:  # diffusers loads an SDXL embedding one encoder at a time
            from safetensors.torch import load_file

            for token, file in files.items():
                state = load_file(str(file))
                for key, (encoder, tokenizer) in zip(SDXL_TOKEN_KEYS, pairs):
                    pipe.load_textual_inversion(state[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
    except ValueError as exc:  # e.g. a token the base tokenizer already has
        raise RecareError(f"export check failed: diffusers could not load the tokens back: {str(exc).splitlines()[0]}",
                          hint="a learned token must not be a word of the base model's vocabulary") from None
    diff = 0.0
    for token, rows in written.items():
        for (encoder, tokenizer), row in zip(pairs, rows):
            table = encoder.get_input_embeddings().weight
            diff = max(diff, max_abs_diff(table[tokenizer.convert_tokens_to_ids(token)].detach().cpu(), row.reshape(-1)))
    if not single:
        usage = [f'pipe = {type(pipe).__name__}.from_pretrained("{ref.spec}")']
        for token, file in files.items():
            path = Path(settings.output) / file.name
            if len(pairs) == 1:
                usage.append(f'pipe.load_textual_inversion("{path}")')
            else:
                usage += [f'state = safetensors.torch.load_file("{path}")',
                          f'pipe.load_textual_inversion(state["clip_l"], token="{token}", '
                          'text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)',
                          f'pipe.load_textual_inversion(state["clip_g"], token="{token}", '
                          'text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)']
        write_model_card(staged, source, ref, settings, diff, usage, type(pipe).__name__)
    names = [] if single else sorted(p.name for p in staged.iterdir())
    return ExportResult("tokens", "", ref.spec, settings.dtype, diff, TOLERANCE[settings.dtype],
                        "the learned embeddings", names, {"tokens": list(embeddings)})
