"""encode / reconstruct / decode stage functions: outputs, dtypes, labels, and provenance refusals."""

import numpy as np
import pytest
import torch
from PIL import Image

from vqtool.artifacts import read_metadata, require_parent
from vqtool.config import to_dict
from vqtool.data.manifest import manifest_sha256
from vqtool.errors import VqtoolError
from vqtool.latents import load_latents
from vqtool.runs import RunPaths
from vqtool.samples import save_samples
from vqtool.vq.encode import decode_artifact, encode_dataset, reconstruct_images
from vqtool.vq.model import VQConfig, VQModel
from vqtool.vq.store import load_vq, save_vq


def write_vq(run, seed=0, codebook_size=16) -> VQModel:
    """A randomly initialised tiny VQ saved as RUN/vq.safetensors (no training needed for these tests)."""
    torch.manual_seed(seed)
    cfg = VQConfig(resolution=16, ch=8, ch_mult=[1, 2], attn_resolutions=[], z_channels=8,
                   codebook_size=codebook_size, code_dim=4)
    model = VQModel(cfg).eval()
    state = model.state_dict()
    save_vq(RunPaths.of(run).vq, cfg, state, state, {"note": "test"},
            parents={"dataset": manifest_sha256(RunPaths.of(run).shards)}, extra={"image_size": 16})
    return model


def test_encode_writes_token_grids_labels_and_parents(tiny_run):
    model = write_vq(tiny_run)
    paths = RunPaths.of(tiny_run)
    r = encode_dataset(tiny_run, batch_size=5, device="cpu")
    assert not r.reused and r.counts == {"train": 36, "val": 12}
    assert r.latent_shape == (8, 8) and r.codebook_size == 16 and r.images_per_s > 0
    lat = load_latents(paths.latents)
    assert lat.latent_shape == (8, 8) and lat.codebook_size == 16 and lat.image_size == 16
    assert lat.splits["train"].tokens.shape == (36, 8, 8)
    assert lat.splits["train"].tokens.dtype == torch.uint8  # 16 codes fit a byte
    assert lat.splits["val"].labels.shape == (12,) and lat.splits["val"].labels.dtype == torch.int64
    assert len(lat.classes) == 8
    art = read_metadata(paths.latents)
    assert art.parents == {"vq": read_metadata(paths.vq).sha256, "dataset": manifest_sha256(paths.shards)}
    # the tokens are exactly what the model gives for the images, in manifest order
    from vqtool.data.loader import ShardLoader

    images, labels = next(iter(ShardLoader(paths.shards, "val", batch_size=12, infinite=False)))
    with torch.no_grad():
        expected = model.encode_to_tokens(images)
    assert torch.equal(lat.splits["val"].tokens.long(), expected)
    assert torch.equal(lat.splits["val"].labels, labels)


def test_encode_reuses_up_to_date_latents_and_refuses_stale_ones(tiny_run):
    paths = RunPaths.of(tiny_run)
    write_vq(tiny_run, seed=0)
    encode_dataset(tiny_run, device="cpu")
    first = paths.latents.read_bytes()
    again = encode_dataset(tiny_run, device="cpu")
    assert again.reused and paths.latents.read_bytes() == first
    old_vq = paths.vq.with_name("old-vq.safetensors")
    old_vq.write_bytes(paths.vq.read_bytes())

    write_vq(tiny_run, seed=1)  # "retrained": a different VQ at the same path
    with pytest.raises(VqtoolError) as info:
        encode_dataset(tiny_run, device="cpu")
    assert "different VQ" in str(info.value) and "--overwrite" in str(info.value) and "\n" not in str(info.value)
    assert paths.latents.read_bytes() == first
    # the prior stage's check refuses the stale latents against the new VQ too
    with pytest.raises(VqtoolError, match="different vq"):
        require_parent(read_metadata(paths.latents), "vq", paths.vq)
    r = encode_dataset(tiny_run, device="cpu", overwrite=True)
    assert not r.reused
    require_parent(read_metadata(paths.latents), "vq", paths.vq)
    with pytest.raises(VqtoolError, match="different vq"):
        require_parent(read_metadata(paths.latents), "vq", old_vq)


def test_encode_refuses_missing_vq_and_other_artifact_kinds(tiny_run):
    with pytest.raises(VqtoolError, match="train-vq"):
        encode_dataset(tiny_run, device="cpu")
    write_vq(tiny_run)
    paths = RunPaths.of(tiny_run)
    paths.latents.write_bytes(paths.vq.read_bytes())
    with pytest.raises(VqtoolError, match="vq-model"):
        encode_dataset(tiny_run, device="cpu")
    with pytest.raises(VqtoolError, match="no VQ model"):
        load_vq(paths.vq.with_name("nope.safetensors"))
    encode_dataset(tiny_run, device="cpu", overwrite=True)
    with pytest.raises(VqtoolError, match="is a 'latents' artifact, expected 'vq-model'"):
        encode_dataset(tiny_run, vq_path=paths.latents, device="cpu")


def test_decode_latents_and_samples(tiny_run, tmp_path):
    model = write_vq(tiny_run)
    paths = RunPaths.of(tiny_run)
    encode_dataset(tiny_run, device="cpu")
    r = decode_artifact(tiny_run, limit=5, out_dir=tmp_path / "dec", device="cpu")
    assert r.kind == "latents" and len(r.files) == 5 and r.grid.exists()
    png = np.asarray(Image.open(r.files[0]))
    assert png.shape == (16, 16, 3) and png.dtype == np.uint8
    tokens = load_latents(paths.latents).splits["val"].tokens[:1].long()
    with torch.no_grad():
        expected = ((model.decode_tokens(tokens)[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0)
    assert np.abs(png.astype(int) - expected.numpy().astype(int)).max() <= 1

    samples = paths.samples_artifact
    save_samples(samples, torch.randint(0, 16, (3, 8, 8)), None, {"seed": 0},
                 parents={"prior": "0" * 64, "vq": read_metadata(paths.vq).sha256}, codebook_size=16)
    r = decode_artifact(tiny_run, out_dir=tmp_path / "s", device="cpu")  # samples are the default source
    assert r.kind == "samples" and len(r.files) == 3

    with pytest.raises(VqtoolError, match="split"):
        decode_artifact(tiny_run, paths.latents, split="test", device="cpu")
    write_vq(tiny_run, seed=5)
    with pytest.raises(VqtoolError, match="different vq"):
        decode_artifact(tiny_run, paths.latents, device="cpu")


def test_reconstruct_files_and_folders(tiny_run, tmp_path):
    write_vq(tiny_run)
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(src / "sub" / "a.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    r = reconstruct_images(tiny_run, [src, tmp_path / "b.jpg"], out_dir=tmp_path / "out", batch_size=2,
                           device="cpu")
    assert r.count == 3 and sorted(p.name for p in r.files) == ["a-1.png", "a.png", "b.png"]
    for f in r.files:
        assert np.asarray(Image.open(f)).shape == (16, 16, 3)
    assert r.grid.exists() and np.isfinite(r.psnr)

    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(VqtoolError, match="bad.png"):
        reconstruct_images(tiny_run, [tmp_path / "bad.png"], device="cpu")
    with pytest.raises(VqtoolError, match="no such"):
        reconstruct_images(tiny_run, [tmp_path / "missing.png"], device="cpu")


def test_vq_artifact_round_trip_keeps_config(tiny_run):
    model = write_vq(tiny_run)
    vq = load_vq(RunPaths.of(tiny_run).vq)
    assert to_dict(vq.model.cfg) == to_dict(model.cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(vq.model.state_dict()[k], v)


def test_token_encoder_pads_to_the_compiled_shape_and_matches_eager():
    """The compiled path always sees one batch shape (a stand-in for torch.compile here: real compilation
    takes minutes); smaller batches are padded and cut, larger ones split, and the tokens are the eager ones."""
    from vqtool.vq.encode import TokenEncoder

    torch.manual_seed(0)
    model = VQModel(VQConfig(resolution=16, ch=8, ch_mult=[1, 2], attn_resolutions=[8], z_channels=8,
                             codebook_size=16, code_dim=4)).eval()
    shapes = []

    def compiled(x):
        shapes.append(tuple(x.shape))
        assert x.is_contiguous()  # compiled from NCHW
        return model.encode_to_tokens(x)

    enc = TokenEncoder(model, torch.device("cpu"), "fp32", compiled=compiled)
    images = torch.rand(11, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = model.encode_to_tokens(images)
    got = torch.cat([enc(images[:4]), enc(images[4:7]), enc(images[7:11])])
    assert torch.equal(got, expected)
    assert enc(images[:10]).shape == (10, 8, 8)  # 10 > 4: split into 4, 4, 2 (padded)
    assert set(shapes) == {(4, 3, 16, 16)}
    eager = TokenEncoder(model, torch.device("cpu"), "fp32")
    assert eager.memory_format == torch.channels_last
    out = eager(images)
    assert out.dtype == torch.int64 and (out == expected).float().mean() > 0.99  # NHWC: float rounding only
