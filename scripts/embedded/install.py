"""Install a trained embedded model into the package (src/omnitransfer/embedded), self-contained.

    python scripts/embedded/install.py --model outputs/embedded-dit/model

`omnitransfer train` exports `transformer/` + `omnitransfer.json` pointing at its base folder
(`base_model`); this copies the base folder's other components (PatchCodec `vae/`, text encoder,
tokenizer, CLIP image encoder, scheduler), the trained transformer, the settings merged (no
`base_model`) and `scripts/embedded/MODEL_CARD.md` as the folder's README, then swaps the folder in
(the old one is removed only after the new one is complete).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from omnitransfer.files import replace_folder

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "src" / "omnitransfer" / "embedded"
CARD = Path(__file__).resolve().with_name("MODEL_CARD.md")
SETTINGS = "omnitransfer.json"
LIMIT_MB = 50


def install(model: Path, output: Path = EMBEDDED) -> Path:
    settings = json.loads((model / SETTINGS).read_text())
    base = (model / settings.pop("base_model")).resolve()
    with tempfile.TemporaryDirectory(prefix=".embedded-", dir=output.parent) as tmp:
        staging = Path(tmp) / "embedded"
        shutil.copytree(base, staging, ignore=shutil.ignore_patterns("transformer", SETTINGS, "README.md"))
        shutil.copytree(model / "transformer", staging / "transformer")
        merged = {**json.loads((base / SETTINGS).read_text()), **settings}
        (staging / SETTINGS).write_text(json.dumps(merged, indent=2) + "\n")
        shutil.copy(CARD, staging / "README.md")
        megabytes = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) / 2**20
        if megabytes > LIMIT_MB:
            raise SystemExit(f"{model}: the installed folder would be {megabytes:.1f} MB (limit {LIMIT_MB} MB)")
        replace_folder(staging, output)
    print(f"installed {model} -> {output} ({megabytes:.1f} MB)")
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "outputs" / "embedded-dit" / "model")
    parser.add_argument("--output", type=Path, default=EMBEDDED)
    args = parser.parse_args(argv)
    install(args.model, args.output)


if __name__ == "__main__":
    main()
