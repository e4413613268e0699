"""Rebuild the embedded default model (src/omnitransfer/embedded): the real Wan2.1 I2V component classes
at a small size with random weights (seed 0). The synthetic-world issue replaces it with a trained model.

    python scripts/build_embedded.py
"""

from pathlib import Path

from omnitransfer.tiny import TinySize, build_tiny_wan_i2v

EMBEDDED = Path(__file__).resolve().parents[1] / "src" / "omnitransfer" / "embedded"
SIZE = TinySize(num_layers=4, height=128, width=128, num_frames=17, fps=8, num_inference_steps=10)

if __name__ == "__main__":
    folder = build_tiny_wan_i2v(EMBEDDED, seed=0, size=SIZE)
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"wrote {folder} ({total / 2**20:.2f} MiB)")
