"""Assemble the embedded model's starting folder: the real Wan2.1 I2V classes at the embedded size
(`omnitransfer.tiny_wan.build_tiny_wan_i2v`), with a light `PatchCodec` fitted on the synthetic world as `vae/`.

    python scripts/embedded/build_model.py --output outputs/embedded-model

The transformer (random weights, seed 0) is what `omnitransfer train` starts from (`model:` in
configs/embedded.yaml); the text encoder, tokenizer and CLIP image encoder stay frozen at their seed-0
weights, except that every modulation table, the time projection and the output head start at zero
(adaLN-Zero, DiT's initialisation for training from scratch: each block starts as the identity; Wan's own
initialisation is meant for fine-tuning, and in a 400-step A/B on identical batches adaLN-Zero logged
10-13% lower losses); the codec's principal components are fitted on the references and targets of the first
`--fit-clips` training samples of every task (seconds). The tokenizer's vocabulary is the tiny
one plus every word of the synthetic world's prompt grammar (`synthetic.VOCABULARY`), appended so the
tiny ids are unchanged: without them 27 of the world's 85 words (patterns such as "striped", shapes such
as "hexagon", colours such as "cyan") would all read as <unk>, and id / style prompts would lose what
they describe.

Native size: 64x64, 17 frames at 8 fps (the world's default), i.e. latents (32, 5, 8, 8) and, with
Wan's (1, 2, 2) patches, 80 tokens per branch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

from omnitransfer.files import replace_folder
from omnitransfer.tiny_wan import TINY_VOCAB, TinySize, build_tiny_wan_i2v

#: The embedded model's size. Transformer: 6 Wan blocks of width 192 (4 heads x 48), FFN 768: 4.4 M
#: parameters (the issue's prototype size, which ran ~1 step/s at batch 16 on 2 cores).
SIZE = TinySize(
    num_layers=6,
    num_attention_heads=4,
    attention_head_dim=48,
    ffn_dim=768,
    freq_dim=64,
    z_dim=32,
    height=64,
    width=64,
    num_frames=17,
    fps=8,
    num_inference_steps=20,
    guidance_scale=5.0,
    flow_shift=3.0,
    text_max_length=32,
)


def world_vocabulary() -> tuple[str, ...]:
    """The tiny tokenizer's vocabulary plus the synthetic world's words it lacks (appended)."""
    from omnitransfer.synthetic import VOCABULARY

    known = set(TINY_VOCAB)
    return TINY_VOCAB + tuple(w for w in VOCABULARY if w not in known)


#: adaLN-Zero: the parameters zeroed in the starting transformer (block and output modulation tables,
#: the time embedding's projection to the six modulation vectors, the output head).
ZEROED = ("scale_shift_table", "condition_embedder.time_proj.", "proj_out.")


def adaln_zero(weights_file: Path) -> None:
    """Zero the ``ZEROED`` parameters of a transformer's safetensors file in place."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(weights_file))
    for name, tensor in weights.items():
        if name.startswith(ZEROED) or name.split(".", 2)[-1].startswith(ZEROED):  # top level or blocks.N.*
            tensor.zero_()
    save_file(weights, str(weights_file), metadata={"format": "pt"})


def build(output: Path, seed: int = 0, fit_clips: int = 40, patch: tuple[int, int, int] | None = None,
          relative: bool = False) -> Path:  # fmt: skip
    """The starting folder at ``SIZE`` (with the transformer's ``patch`` size when given; a ``relative`` codec
    codes later frames as differences from the first)."""
    from omnitransfer.patch_codec import PatchCodec
    from omnitransfer.synthetic import fixed_clips

    codec = PatchCodec.fit(fixed_clips("train", fit_clips, SIZE.height, SIZE.width, SIZE.num_frames), SIZE.z_dim,
                           relative=relative)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix=".embedded-model-", dir=output.parent) as tmp:
        size = SIZE if patch is None else dataclasses.replace(SIZE, patch_size=patch)
        staging = build_tiny_wan_i2v(Path(tmp) / "model", seed=seed, size=size, vocabulary=world_vocabulary())
        adaln_zero(staging / "transformer" / "diffusion_pytorch_model.safetensors")
        shutil.rmtree(staging / "vae")
        codec.save_pretrained(staging / "vae")
        index = json.loads((staging / "model_index.json").read_text())
        index["vae"] = ["omnitransfer", "PatchCodec"]
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        replace_folder(staging, output)
    return output


def check(folder: Path) -> None:
    """Load the folder with the project's pipeline; report sizes and the codec's round trip on test clips."""
    import torch

    from omnitransfer.pipeline import OmniTransferPipeline
    from omnitransfer.synthetic import fixed_clips

    pipe = OmniTransferPipeline.from_pretrained(folder)
    n_dit = sum(p.numel() for p in pipe.transformer.parameters())
    clips = fixed_clips("test", 1)
    with torch.no_grad():
        latents = torch.cat([pipe.codec.encode(c[None]) for c in clips])
        recon = torch.cat([pipe.codec.decode(z[None]) for z in latents])
    psnr = 10 * torch.log10(4 / (recon - clips).pow(2).mean())
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    unk = pipe.tokenizer.unk_token_id
    from omnitransfer.synthetic import VOCABULARY

    unknown = [w for w in VOCABULARY if unk in pipe.tokenizer(w, add_special_tokens=False).input_ids]
    print(json.dumps({
        "folder": str(folder), "megabytes": round(size / 2**20, 2), "transformer_params": n_dit,
        "latent_shape": list(latents.shape[1:]), "latent_mean": round(float(latents.mean()), 3),
        "latent_std": round(float(latents.std()), 3), "test_psnr": round(float(psnr), 2),
        "world_words_unknown_to_tokenizer": unknown, "round_trip_scores": round_trip_scores(pipe),
    }))  # fmt: skip


def round_trip_scores(pipe, count: int = 10) -> dict[str, float]:
    """The world's metrics of the true test targets after a codec round trip: the best any DiT over this
    codec could score (means over ``count`` test samples per task)."""
    import numpy as np
    import torch

    from omnitransfer.codecs import to_uint8, to_unit_range
    from omnitransfer.synthetic.metrics import candidate_descriptors, evaluate
    from omnitransfer.tasks import Family, Task
    from omnitransfer.transfer_benchmark import HEADLINES, native_sample

    scores = {}
    for task in Task:
        metric, values = HEADLINES[task.value][0][0], []
        for index in range(count):
            sample = native_sample(pipe, task, index)
            with torch.no_grad():
                decoded = to_uint8(pipe.codec.decode(pipe.codec.encode(to_unit_range(sample.target))))
            candidates = candidate_descriptors(sample) if task.family is Family.APPEARANCE else None
            values.append(evaluate(sample, decoded, candidates)[metric])
        scores[f"{task.value} {metric}"] = round(float(np.mean(values)), 3)
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-clips", type=int, default=40, help="training samples per task the codec is fitted on")
    parser.add_argument("--output", type=Path, default=Path("outputs/embedded-model"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch", type=int, nargs=3, metavar=("F", "H", "W"),
                        help="latents per token (Wan's 1 2 2 by default; 1 1 1: 4x the tokens)")  # fmt: skip
    parser.add_argument("--relative", action="store_true",
                        help="code each later 4-frame group as its difference from the coded first frame")  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    patch = None if args.patch is None else tuple(args.patch)
    check(build(args.output, args.seed, args.fit_clips, patch, args.relative))


if __name__ == "__main__":
    sys.exit(main())
