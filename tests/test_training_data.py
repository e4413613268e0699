"""Training data: the manifest, its preparation into a latent cache, and the cache read back."""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitransfer import InputError, OmniTransferPipeline, Reference, Task
from omnitransfer.cli import add_prepare_command
from omnitransfer.codecs import WanVAECodec
from omnitransfer.model_folder import EMBEDDED_MODEL
from omnitransfer.patch_codec import PatchCodec
from omnitransfer.training import cache as cache_module
from omnitransfer.training.cache import LatentCache, tensor_shapes
from omnitransfer.training.manifest import ManifestError, load_manifest
from omnitransfer.training.prepare import encoders_digest, prepare
from omnitransfer.video import read_video, save_video

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"

SIZE = dict(num_frames=5, height=32, width=32)
Z = PatchCodec.from_pretrained(EMBEDDED_MODEL / "vae").latent_channels  # the embedded model's latent channels
GOOD = [  # lines 1, 2, 4, 5 (line 3 is blank)
    {"task": "camera", "reference": "clips/a.mp4", "target": "clips/t1.mp4", "prompt": "a red car", "split": "x"},
    {
        "task": "id",
        "reference": "clips/b.mp4",
        "target": "clips/t2.mp4",
        "prompt": "a woman",
        "reference_prompt": "a man",
    },
    None,
    {
        "task": ["id", "motion"],
        "reference": ["clips/b.mp4", "clips/a.mp4"],
        "target": "clips/t1.mp4",
        "prompt": "a dancer",
        "reference_prompt": ["a man", ""],
        "image": "first.png",
        "truth": {"any": "thing"},
    },
    {"task": "camera", "reference": "clips/c.mp4", "target": "clips/t2.mp4"},
]
# Distinct inputs of GOOD: videos a, b, c, t1, t2 and first frames of t1, first.png, t2.
CODEC_ENCODES = 8


def _clip(seed, frames=6, height=40, width=56):
    base = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 3 * i, axis=1) for i in range(frames)])  # a textured pan


def _write(path: Path, records) -> Path:
    path.write_text(
        "".join("\n" if r is None else (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    )
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for seed, name in enumerate(["a", "b", "c", "t1", "t2"]):
        save_video(_clip(seed), root / "clips" / f"{name}.mp4", fps=8)
    (root / "clips" / "bad.mp4").write_bytes(b"not a video at all")
    (root / "bad.png").write_bytes(b"not an image")
    from PIL import Image

    Image.fromarray(_clip(9, frames=1, height=48, width=48)[0]).save(root / "first.png")
    _write(root / "good.jsonl", GOOD)
    return root


@pytest.fixture(scope="module")
def pipe():
    return OmniTransferPipeline.from_pretrained(None)


def _count_encodes(monkeypatch) -> list:
    """Count the codec's encode calls (whichever codec class the embedded model has)."""
    calls = []
    for codec_class in (WanVAECodec, PatchCodec):
        encode = codec_class.encode
        monkeypatch.setattr(
            codec_class, "encode", lambda self, video, encode=encode: calls.append(video.shape) or encode(self, video)
        )
    return calls


def _prepare(manifest, output, **kw):
    return prepare(manifest, output, None, shard_size=3, progress=False, **{**SIZE, **kw})


@pytest.fixture(scope="module")
def cache_dir(data, tmp_path_factory):
    """A cache prepared through the CLI entry point (embedded model), with its codec calls counted."""
    parser = argparse.ArgumentParser()
    add_prepare_command(parser.add_subparsers())
    output = tmp_path_factory.mktemp("prep") / "cache"
    args = parser.parse_args(
        ["prepare", "--manifest", str(data / "good.jsonl"), "--output", str(output), "--shard-size", "3", "--quiet"]
        + ["--height", "32", "--width", "32", "--frames", "5"]
    )
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_encodes(mp)
        args.run(args)
    assert len(calls) == CODEC_ENCODES  # each distinct video and first frame once
    return output


# ---------------------------------------------------------------------------- manifest


def test_good_manifest_loads(data):
    records = load_manifest(data / "good.jsonl")
    assert [r.line for r in records] == [1, 2, 4, 5]
    camera, ident, combo, empty = records
    assert camera.tasks == (Task.CAMERA,) and camera.references == (data / "clips/a.mp4",)
    assert camera.target == data / "clips/t1.mp4" and camera.target.is_absolute()
    assert camera.image is None and camera.image_from_target and camera.has_image  # temporal: target's frame
    assert ident.image is None and not ident.image_from_target and not ident.has_image  # appearance only
    assert ident.reference_prompts == ("a man",) and camera.reference_prompts == ("",)
    assert combo.tasks == (Task.ID, Task.MOTION) and combo.references == (data / "clips/b.mp4", data / "clips/a.mp4")
    assert combo.image == data / "first.png" and not combo.image_from_target
    assert combo.reference_prompts == ("a man", "")
    assert empty.prompt == "" and empty.image_from_target


BAD = {
    "json": ('{"task": "camera", "reference": ', None),
    "object": ("[1, 2]", None),
    "task": ({"task": "dance", "reference": "clips/a.mp4", "target": "clips/t1.mp4"}, "task"),
    "missing": ({"task": "camera", "reference": "clips/a.mp4"}, "target"),
    "type": ({"task": "camera", "reference": "clips/a.mp4", "target": "clips/t1.mp4", "prompt": 3}, "prompt"),
    "caption": ({"task": "style", "reference": "clips/a.mp4", "target": "clips/t1.mp4"}, "prompt"),
    "length": (
        {"task": ["id", "motion"], "reference": "clips/a.mp4", "target": "clips/t1.mp4", "prompt": "x"},
        "reference",
    ),
    "ref_prompts": (
        {"task": "camera", "reference": "clips/a.mp4", "target": "clips/t1.mp4", "reference_prompt": ["a", "b"]},
        "reference_prompt",
    ),
    "no_video": ({"task": "camera", "reference": "clips/nope.mp4", "target": "clips/t1.mp4"}, "reference"),
    "bad_video": ({"task": "camera", "reference": "clips/a.mp4", "target": "clips/bad.mp4"}, "target"),
    "no_image": ({"task": "camera", "reference": "clips/a.mp4", "target": "clips/t1.mp4", "image": "no.png"}, "image"),
    "bad_image": (
        {"task": "camera", "reference": "clips/a.mp4", "target": "clips/t1.mp4", "image": "bad.png"},
        "image",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_each_bad_record_is_one_line_naming_file_line_and_field(data, case):
    record, field = BAD[case]
    path = _write(data / f"bad-{case}.jsonl", [GOOD[0], None, record])
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{path}:3: ")
    if field is not None:
        assert f"field '{field}'" in line


def test_every_bad_record_is_reported(data):
    path = _write(data / "two-bad.jsonl", [BAD["task"][0], GOOD[0], BAD["bad_video"][0], BAD["no_image"][0]])
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    lines = str(err.value).splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert isinstance(err.value, InputError) and err.value.problems == lines
    # two problems of one record stay on its line
    path = _write(
        data / "two-problems.jsonl", [{"task": "dance", "reference": "clips/a.mp4", "target": "clips/no.mp4"}]
    )
    (line,) = str(pytest.raises(ManifestError, load_manifest, path).value).splitlines()
    assert "field 'task'" in line and "field 'target'" in line


def test_empty_or_missing_manifest(data):
    with pytest.raises(ManifestError, match="no records"):
        load_manifest(_write(data / "empty.jsonl", [None, None]))
    with pytest.raises(InputError, match="no such file"):
        load_manifest(data / "absent.jsonl")
    load_manifest(_write(data / "unchecked.jsonl", [BAD["no_video"][0]]), check_files=False)  # files not opened


# ---------------------------------------------------------------------------- prepare + cache


def test_cache_layout_and_shapes(cache_dir):
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == [
        ".omnitransfer.lock",  # the writer's lock, left in place (see files.FolderLock)
        "extra.safetensors",
        "index.json",
        "prepare.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    cache = LatentCache(cache_dir)
    assert len(cache) == 4
    assert {k: cache.info[k] for k in ("height", "width", "num_frames", "text_max_length", "model")} == dict(
        height=32, width=32, num_frames=5, text_max_length=32, model="embedded"
    )
    latent = (Z, 2, 4, 4)
    combo = cache[2]
    assert combo.tasks == (Task.ID, Task.MOTION) and combo.index == 2
    assert combo.target.shape == combo.condition.shape == latent and combo.target.dtype == torch.float32
    assert combo.image_tokens.shape == (17, cache.info["text_dim"])  # 4x4 patches + class token, width 32
    assert [r.shape for r in combo.references] == [latent, latent]
    assert [p.shape for p in combo.reference_prompts] == [(32, 32), (32, 32)] and combo.prompt.shape == (32, 32)
    ident = cache[1]
    assert ident.condition is None and ident.image_tokens is None
    stored = tensor_shapes(cache_dir / "shard-00000.safetensors")
    assert stored["0.prompt"] == [4, 32] and stored["1.reference_prompt.0"] == [3, 32]  # unpadded: words + EOS
    assert "1.condition" not in stored and stored["2.reference.1"] == list(latent)
    assert cache.null_prompt.shape == (32, 32)
    with pytest.raises(IndexError):
        cache[4]


def test_cached_tensors_equal_live_encoding(cache_dir, data, pipe):
    cache = LatentCache(cache_dir)
    frames = read_video(data / "clips/t2.mp4", **SIZE)  # (5, 32, 32, 3), as cached: resized and resampled
    video = torch.tensor(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    assert torch.equal(cache[1].target, pipe.codec.encode(video)[0])
    for i, prompt in [(0, "a red car"), (1, "a woman"), (3, "")]:
        assert torch.allclose(cache[i].prompt, pipe.encode_text([prompt])[0], atol=1e-6)
    assert torch.allclose(cache[1].reference_prompts[0], pipe.encode_text(["a man"])[0], atol=1e-6)
    assert torch.allclose(cache.null_prompt, pipe.encode_text([""])[0], atol=1e-6)
    assert cache[0].prompt[4:].abs().sum() == 0 and cache[0].prompt[3].abs().sum() > 0  # 3 words + EOS


def _generation_inputs(pipe, **kw) -> dict:
    """What one guided generation step hands the transformer: target input, text, image tokens, references."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("step", args)

    encode_refs = pipe.transformer.encode_references

    def capture(refs, grid, cache=None):
        seen["refs"] = refs
        return encode_refs(refs, grid, cache)

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    pipe.transformer.encode_references = capture
    try:
        pipe(**kw, **SIZE, num_inference_steps=1, progress=False, output_type="latent")
    finally:
        handle.remove()
        del pipe.transformer.encode_references
    model_in, _, text, image_tokens = seen["step"]
    return dict(condition=model_in[0, Z + 4 :], text=text, image_tokens=image_tokens[0], refs=seen["refs"])


@pytest.mark.parametrize("i", [0, 2])
def test_cached_conditioning_equals_generation(cache_dir, data, pipe, i):
    """A record's cached first-frame latent, CLIP tokens, prompts and reference latents are the generation's."""
    cache, record = LatentCache(cache_dir), load_manifest(data / "good.jsonl")[i]
    image = record.image or read_video(record.target, **SIZE)[0]  # explicit, or the target's first frame
    refs = [Reference(t, p, c) for t, p, c in zip(record.tasks, record.references, record.reference_prompts)]
    live = _generation_inputs(pipe, references=refs, image=image, prompt=record.prompt, negative_prompt="")
    sample = cache[i]
    assert torch.allclose(sample.condition, live["condition"], atol=1e-6)  # [latent | mask 4 | condition]
    assert torch.allclose(sample.image_tokens, live["image_tokens"], atol=1e-6)
    assert torch.allclose(sample.prompt, live["text"][0], atol=1e-5)
    assert torch.allclose(cache.null_prompt, live["text"][1], atol=1e-5)  # the unconditional branch
    for cached, cached_text, ref in zip(sample.references, sample.reference_prompts, live["refs"]):
        assert torch.allclose(cached, ref.latents[0, :Z], atol=1e-6)  # [latent | flag | latent]
        assert torch.allclose(cached_text, ref.context[0], atol=1e-5)


def test_signatures_group_stackable_samples(cache_dir):
    cache = LatentCache(cache_dir)
    sigs = [cache.signature(i) for i in range(len(cache))]
    assert sigs[0] == sigs[3] == ((Task.CAMERA,), (Z, 2, 4, 4), ((Z, 2, 4, 4),), True)
    assert len(set(sigs)) == 3 and sigs[1][3] is False


def test_resume_encodes_only_missing_shard(cache_dir, data, tmp_path, monkeypatch):
    resumed = tmp_path / "cache"
    shutil.copytree(cache_dir, resumed)
    (resumed / "shard-00001.safetensors").unlink()
    (resumed / "index.json").unlink()

    def interrupted(tensors, path):  # Ctrl-C while the shard is half written
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_module, "save_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _prepare(data / "good.jsonl", resumed)
    kept = ["extra.safetensors", "prepare.json", "shard-00000.safetensors"]
    assert sorted(p.name for p in resumed.iterdir() if p.name != ".omnitransfer.lock") == kept
    (resumed / ".shard-00001.safetensors.tmp-999999-deadbeef").write_bytes(b"partial")  # as left by a killed process
    calls = _count_encodes(monkeypatch)
    report = _prepare(data / "good.jsonl", resumed)
    assert len(calls) == 3  # record 3 only: videos c, t2 and t2's first frame
    assert (report.shards, report.shards_skipped, report.records) == (2, 1, 4)
    assert [p.name for p in resumed.glob(".*")] == [".omnitransfer.lock"]  # no temporary left
    assert json.loads((resumed / "index.json").read_text()) == json.loads((cache_dir / "index.json").read_text())
    a, b = LatentCache(cache_dir), LatentCache(resumed)
    for i in range(len(a)):
        for field, value in vars(a[i]).items():
            other = vars(b[i])[field]
            tensors = value if isinstance(value, list) else [value]
            others = other if isinstance(other, list) else [other]
            for x, y in zip(tensors, others):
                assert (x == y).all() if isinstance(x, torch.Tensor) else x == y, field

    with pytest.raises(InputError, match="holds another preparation.*height"):
        _prepare(data / "good.jsonl", resumed, height=48)


def test_a_cache_goes_stale_when_its_encoders_change(cache_dir, data, tmp_path):
    """Refitting the codec in the same model folder: prepare will not resume the old cache, and the
    trainer will not train that model on it (its latents are another codec's)."""
    from omnitransfer.training.config import load_config
    from omnitransfer.training.trainer import Trainer

    model = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL, model)
    assert encoders_digest(model) == encoders_digest(None)  # the files' content counts, not their place
    resumed = tmp_path / "cache"
    shutil.copytree(cache_dir, resumed)
    fingerprint = json.loads((resumed / "prepare.json").read_text())
    fingerprint["model"] = str(model.resolve())
    (resumed / "prepare.json").write_text(json.dumps(fingerprint))
    overrides = [
        f"data={resumed}",
        f"model={model}",
        "stages=[{name: dit, steps: 1, trainable: blocks}]",
        "global_batch=1",
        "micro_batch=1",
    ]
    Trainer(load_config(TOY, overrides), tmp_path / "same")  # same encoders: accepted

    codec = PatchCodec.from_pretrained(model / "vae")
    codec.group_scale.mul_(2)
    codec.save_pretrained(model / "vae")
    assert encoders_digest(model) != encoders_digest(None)
    with pytest.raises(InputError, match="holds another preparation.*encoders"):
        prepare(data / "good.jsonl", resumed, model, shard_size=3, progress=False, **SIZE)
    with pytest.raises(InputError, match="prepared with other encoders"):
        Trainer(load_config(TOY, overrides), tmp_path / "refitted")


def test_corrupt_cache_is_one_line_input_error(cache_dir, tmp_path):
    def error(folder) -> str:
        with pytest.raises(InputError) as err:
            LatentCache(folder)[0]
        assert "\n" not in str(err.value)
        return str(err.value)

    broken = tmp_path / "c"
    shutil.copytree(cache_dir, broken)
    (broken / "shard-00001.safetensors").unlink()
    assert "shard-00001.safetensors is missing" in error(broken)
    (broken / "index.json").write_text('{"version": 1, "records": ')
    assert "corrupt index" in error(broken)
    (broken / "index.json").write_text(json.dumps({"version": 1, "records": []}))
    assert "corrupt index" in error(broken)
    (broken / "index.json").unlink()
    assert "no such file" in error(broken)
    shutil.rmtree(broken)
    shutil.copytree(cache_dir, broken)
    (broken / "shard-00000.safetensors").write_bytes(b"\x00" * 8)
    assert "cannot read the shard" in error(broken)
