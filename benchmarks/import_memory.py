"""Wall time and peak memory of `vqtool import` against a plain `torch.load` of the same file.

Builds two ~80M-parameter checkpoints with random weights: one in Unleashing Transformers' absorbing
format (24 layers, width 512, 16×16 grid, 1024 codes; keys as the official code saves them) and one
in Taming's Lightning format (the same GPT as a Net2NetTransformer, with a small first-stage VQModel).
Each measurement runs in a fresh process, so its peak resident memory (VmHWM) minus the resident memory
after imports is what that operation needed. Targets: peak under 2.5× the file size; at most 2× torch.load's time.
Rows: `torch.load` (the reference), `torch.save` (writing the loaded tensors out again, timed alone, no
fsync: what any conversion also pays), `read` (vqtool's safe reader alone), `import` (read, convert,
check, write the artifact durably with fsync, hash both files).

    python benchmarks/import_memory.py [--layers 24] [--width 512] [--rounds 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, sys, time
import torch
from vqtool.interop.importer import import_checkpoint
from vqtool.interop.torchfile import read_torch_file
mode, path, out, config, heads = sys.argv[1:6]
def rss(field="VmHWM"):
    # The high-water mark of this process's memory map: unlike ru_maxrss it does not inherit the parent's peak.
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
base = rss("VmRSS")
t0 = time.perf_counter()
if mode == "torch.load":
    obj = torch.load(path, map_location="cpu", weights_only=True)
elif mode == "torch.save":  # the cost of writing the same tensors out again, as torch would (no fsync)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    base, t0 = rss(), time.perf_counter()
    torch.save(obj, out)
elif mode == "read":
    obj = read_torch_file(path)
else:
    import_checkpoint(path, out=out, config=config or None, heads=int(heads) if heads else None, overwrite=True)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak": rss() - base}))
"""


def gpt_blocks(prefix: str, layers: int, d: int, causal_block: int | None, g: torch.Generator) -> dict:
    sd = {}
    for i in range(layers):
        b = f"{prefix}blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + f"{ln}.weight"], sd[b + f"{ln}.bias"] = torch.ones(d), torch.zeros(d)
        for name in ("key", "query", "value", "proj"):
            sd[b + f"attn.{name}.weight"] = torch.randn(d, d, generator=g) * 0.02
            sd[b + f"attn.{name}.bias"] = torch.zeros(d)
        if causal_block:
            sd[b + "attn.mask"] = torch.tril(torch.ones(causal_block, causal_block)).view(1, 1, causal_block,
                                                                                            causal_block)
        sd[b + "mlp.0.weight"], sd[b + "mlp.0.bias"] = torch.randn(4 * d, d, generator=g) * 0.02, torch.zeros(4 * d)
        sd[b + "mlp.2.weight"], sd[b + "mlp.2.bias"] = torch.randn(d, 4 * d, generator=g) * 0.02, torch.zeros(d)
    sd[prefix + "ln_f.weight"], sd[prefix + "ln_f.bias"] = torch.ones(d), torch.zeros(d)
    return sd


def ut_absorbing(layers: int, d: int, codes: int, tokens: int, g: torch.Generator) -> dict:
    sd = {"Lt_history": torch.zeros(257), "Lt_count": torch.zeros(257), "loss_history": torch.zeros(257)}
    sd["_denoise_fn.tok_emb.weight"] = torch.randn(codes + 1, d, generator=g) * 0.02
    sd["_denoise_fn.pos_emb"] = torch.randn(1, tokens, d, generator=g) * 0.02
    sd["_denoise_fn.start_tok"] = torch.zeros(1, 1, d)
    sd.update(gpt_blocks("_denoise_fn.", layers, d, None, g))
    sd["_denoise_fn.head.weight"] = torch.randn(codes, d, generator=g) * 0.02
    return sd


def taming_vq(codes: int, g: torch.Generator, ch: int = 32, z: int = 16) -> dict:
    """A one-level Taming VQModel (16 px → 16×16 codes): small, so the GPT dominates the file."""
    sd = {}

    def conv(key: str, c_out: int, c_in: int, k: int) -> None:
        sd[key + ".weight"] = torch.randn(c_out, c_in, k, k, generator=g) * 0.05
        sd[key + ".bias"] = torch.zeros(c_out)

    def norm(key: str, c: int) -> None:
        sd[key + ".weight"], sd[key + ".bias"] = torch.ones(c), torch.zeros(c)

    def res(key: str) -> None:
        norm(key + ".norm1", ch), conv(key + ".conv1", ch, ch, 3)
        norm(key + ".norm2", ch), conv(key + ".conv2", ch, ch, 3)

    def attn(key: str) -> None:
        norm(key + ".norm", ch)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{key}.{part}", ch, ch, 1)

    for side in ("encoder", "decoder"):
        res(f"{side}.mid.block_1"), attn(f"{side}.mid.attn_1"), res(f"{side}.mid.block_2"), norm(f"{side}.norm_out", ch)
    conv("encoder.conv_in", ch, 3, 3)
    res("encoder.down.0.block.0")
    conv("encoder.conv_out", z, ch, 3)
    conv("quant_conv", z, z, 1)
    sd["quantize.embedding.weight"] = torch.randn(codes, z, generator=g)
    conv("post_quant_conv", z, z, 1)
    conv("decoder.conv_in", ch, z, 3)
    res("decoder.up.0.block.0"), res("decoder.up.0.block.1")
    conv("decoder.conv_out", 3, ch, 3)
    return sd


def taming_yaml(path: Path, layers: int, d: int, codes: int, tokens: int) -> None:
    import yaml

    dd = {"double_z": False, "z_channels": 16, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    project = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "sos_token": 0, "cond_stage_config": "__is_unconditional__",
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {
            "vocab_size": codes, "block_size": tokens, "n_layer": layers, "n_head": 8, "n_embd": d}},
        "first_stage_config": {"target": "taming.models.vqgan.VQModel",
                               "params": {"embed_dim": 16, "n_embed": codes, "ddconfig": dd}}}}}
    path.write_text(yaml.safe_dump(project))


def measure(mode: str, path: Path, out: Path, config: str = "", heads: str = "") -> dict:
    for stale in (out, out.with_name(f"{out.stem}-vq.safetensors")):
        stale.unlink(missing_ok=True)  # every write goes to a new file, as a first import does
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(out), config, heads],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--codes", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="folder for the checkpoints (default: a temp folder)")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="vqtool-import-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tokens = 256

    ut = folder / "absorbing_ema_1000.th"
    sd = ut_absorbing(args.layers, args.width, args.codes, tokens, g)
    params = sum(t.numel() for t in sd.values())
    torch.save(sd, ut)
    tt, tt_yaml = folder / "last.ckpt", folder / "project.yaml"
    gpt = {"transformer.tok_emb.weight": torch.randn(args.codes, args.width, generator=g) * 0.02,
           "transformer.pos_emb": torch.randn(1, tokens, args.width, generator=g) * 0.02,
           "transformer.head.weight": torch.randn(args.codes, args.width, generator=g) * 0.02}
    gpt.update(gpt_blocks("transformer.", args.layers, args.width, tokens, g))
    gpt.update({f"first_stage_model.{k}": v for k, v in taming_vq(args.codes, g).items()})
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": gpt,
                "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}, tt)
    taming_yaml(tt_yaml, args.layers, args.width, args.codes, tokens)
    del sd, gpt
    print(f"checkpoints of {params / 1e6:.1f}M parameters in {folder}")

    cases = [("UT absorbing", ut, "", "8"), ("Taming Lightning", tt, str(tt_yaml), "")]
    print(f"{'checkpoint':<18}{'size MB':>9}{'operation':>13}{'seconds':>9}{'peak MB':>9}{'peak/size':>11}"
          f"{'time/load':>11}")
    for name, path, config, heads in cases:
        size = path.stat().st_size
        for _ in range(args.rounds):
            load = measure("torch.load", path, folder / "x.safetensors")
            rows = [("torch.load", load), ("torch.save", measure("torch.save", path, folder / "x.pt")),
                    ("read", measure("read", path, folder / "x.safetensors")),
                    ("import", measure("import", path, folder / "x.safetensors", config, heads))]
            for op, r in rows:
                print(f"{name:<18}{size / 1e6:>9.1f}{op:>13}{r['seconds']:>9.2f}{r['peak'] / 1e6:>9.1f}"
                      f"{r['peak'] / size:>11.2f}{r['seconds'] / load['seconds']:>11.2f}")
    if args.keep is None:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
