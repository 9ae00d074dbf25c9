"""GGUF files as city96's ComfyUI-GGUF writes and reads them, for the host tests (no import of ComfyUI-GGUF).

``write_gguf`` stores a state dict in the layout of ComfyUI-GGUF's ``tools/convert.py``: ``general.architecture``,
1-D and small tensors in F32, its ``shape_fix`` reshape to rows of 256 with the original shape in
``comfy.gguf.orig_shape.<key>``. Quantized with the ``gguf`` package (F16, BF16, Q8_0, Q4_0/1, Q5_0/1) or with the
K-quant packer here (Q4_K, Q5_K, Q6_K in ggml's block layout, checked against ``gguf.quants.dequantize``).

``runtime_state_dict`` reads a file back as ComfyUI-GGUF computes with it. Its ``dequantize_tensor(t, dtype,
dequant_dtype)`` does the block arithmetic in float16 unless the advanced loader's ``dequant_dtype`` says otherwise
(``d.view(float16).to(None)`` stays float16), so its values differ from ``gguf.quants.dequantize`` (float32
arithmetic) by float16 rounding: the fp32 reference file of an exactness test must hold these values.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
PREFIX = "model.diffusion_model."  # stripped, as convert.py and ComfyUI-GGUF's loader do
SMALL = 1024  # convert.py QUANTIZATION_THRESHOLD: tensors of at most this many elements stay F32
RESHAPE_MIN = 512  # convert.py REARRANGE_THRESHOLD
SHAPE_FIX = {"sd1", "sdxl"}  # the architectures whose convert.py template sets shape_fix
HIGH_PRECISION = {"wan": (".modulation",), "hidream": (".ff_i.gate.weight", "img_emb.emb_pos"),
                  "ltxv": ("scale_shift_table",), "cosmos": ("pos_embedder",)}  # convert.py keys_hiprec: F32
F32 = np.float32


def write_gguf(path, state_dict: dict[str, torch.Tensor], qtype: str = "Q8_0", arch: str = "sd1",
               shape_fix: bool | None = None) -> dict[str, str]:
    """Write ``state_dict`` (diffusion-model keys, with or without ``model.diffusion_model.``) as a GGUF file.

    ``shape_fix``: reshape weights whose rows are not a multiple of 256 (None: where convert.py does, for sd1 and
    sdxl; True lets small DiT test models take K-quants). A tensor whose rows still do not fit the block size is
    written F16, convert.py's fallback. Returns the quant type written per key.
    """
    target = Q[qtype]
    shape_fix = arch in SHAPE_FIX if shape_fix is None else shape_fix
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix(PREFIX)
        data = tensor.detach().cpu().to(torch.float32).numpy()
        kind, five_d = target, data.ndim > 4
        if five_d:  # Wan's Conv3d patch embedding: F32 in its original shape, as fix_5d_tensors.py adds it
            writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(n) for n in data.shape])
            data = data.reshape(data.shape[0], -1)
        if five_d or data.ndim == 1 or data.size <= SMALL or any(s in key for s in HIGH_PRECISION.get(arch, ())):
            kind = Q.F32
        if (shape_fix and not five_d and data.ndim > 1 and data.size >= RESHAPE_MIN and data.size % 256 == 0
                and data.shape[-1] % 256):
            writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(n) for n in data.shape])
            data = data.reshape(-1, 256)
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = Q.F16
        writer.add_tensor(key, quantize(data, kind), raw_dtype=kind)
        written[key] = kind.name
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def quantize(data: np.ndarray, kind: Q) -> np.ndarray:
    """``data`` (rows a multiple of the block size) as the bytes (or F32/F16 values) of quant type ``kind``."""
    if kind not in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return gguf.quants.quantize(data.astype(F32), kind)
    rows = data.astype(F32).reshape(-1, 256)
    return pack_k(*quantize_k(rows, kind), kind).reshape(*data.shape[:-1], -1)


def _safe(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 1).astype(F32)


def quantize_k(x: np.ndarray, kind: Q) -> tuple:
    """Rows of 256 as K-quant parts ``(d, dmin, sc, m, q)``: value = (d*sc)*q - dmin*m per sub-block.

    Q4_K/Q5_K: 8 sub-blocks of 32, 6-bit scales and mins, q in 0..15 / 0..31 (mins at most 0, as in ggml).
    Q6_K: 16 sub-blocks of 16, int8 scales, q in -32..31, no mins (``dmin``, ``m`` None). A plain min/max
    choice of scales, not llama.cpp's search: the error is a little larger, the layout is the same.
    """
    n = x.shape[0]
    if kind == Q.Q6_K:
        sub = x.reshape(n, 16, 16)
        scale = np.abs(sub).max(-1) / 31
        d = (scale.max(-1, keepdims=True) / 127).astype(np.float16)
        sc = np.clip(np.rint(scale / _safe(d.astype(F32))), 0, 127)
        q = np.clip(np.rint(sub / _safe(d.astype(F32) * sc)[..., None]), -32, 31)
        return d, None, sc, None, q
    nmax = 15 if kind == Q.Q4_K else 31
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    scale = (sub.max(-1) - low) / nmax
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = ((-low).max(-1, keepdims=True) / 63).astype(np.float16)
    sc = np.clip(np.rint(scale / _safe(d.astype(F32))), 0, 63)
    m = np.clip(np.rint(-low / _safe(dmin.astype(F32))), 0, 63)
    q = np.clip(np.rint((sub + (dmin.astype(F32) * m)[..., None]) / _safe(d.astype(F32) * sc)[..., None]), 0, nmax)
    return d, dmin, sc, m, q


def pack_k(d, dmin, sc, m, q, kind: Q) -> np.ndarray:
    """The parts of ``quantize_k`` in ggml's block layout: (rows, type size) uint8."""
    n = q.shape[0]
    if kind == Q.Q6_K:
        q = (q.reshape(n, 256) + 32).astype(np.uint8)
        low = (q & 15).reshape(n, 2, 2, 64)  # [half, nibble, byte]
        high = (q >> 4).reshape(n, 2, 4, 32)  # [half, bit pair, byte]
        ql = low[:, :, 0] | (low[:, :, 1] << 4)
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8),
                               d.view(np.uint8)], axis=1)
    sc, m, q = sc.astype(np.uint8), m.astype(np.uint8), q.reshape(n, 256).astype(np.uint8)
    scales = [sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
              (sc[:, 4:] & 15) | (m[:, 4:] << 4)]  # 6-bit scales and mins, as get_scale_min unpacks them
    nibbles = (q & 15).reshape(n, 4, 2, 32)  # sub-blocks 2g and 2g+1 share 32 bytes
    parts = [d.view(np.uint8), dmin.view(np.uint8), *scales]
    if kind == Q.Q5_K:
        bits = (q >> 4).reshape(n, 8, 32)
        parts.append(np.bitwise_or.reduce(bits << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
    parts.append((nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(n, 128))
    return np.concatenate(parts, axis=1)


def _op(a, b, ar, fn):
    """One elementwise step as torch does it in ``ar`` (float16: computed in float32, rounded to float16)."""
    return fn(np.asarray(a).astype(F32), np.asarray(b).astype(F32)).astype(ar)


def dequantize(raw: np.ndarray, kind: Q, ar=np.float16) -> np.ndarray:
    """Flat values of the blocks ``raw``, step by step as ComfyUI-GGUF's ``dequant.py`` computes them in ``ar``
    (float16 for its default ``dequant_dtype``; float32 gives ``gguf.quants.dequantize``'s values)."""
    if kind in (Q.F32, Q.F16, Q.BF16):
        return gguf.quants.dequantize(raw, kind).reshape(-1)  # exact; BF16 is float32 arithmetic there too
    b = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, gguf.GGML_QUANT_SIZES[kind][1])
    n, mul, sub = len(b), np.multiply, np.subtract
    if kind == Q.Q8_0:
        return _op(b[:, :2].view(np.float16), b[:, 2:].view(np.int8), ar, mul).reshape(-1)
    if kind in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        at = 4 if kind in (Q.Q4_1, Q.Q5_1) else 2
        five = kind in (Q.Q5_0, Q.Q5_1)
        qs = b[:, at + 4 * five:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int16)
        if five:
            q |= np.unpackbits(b[:, at:at + 4], axis=1, bitorder="little").astype(np.int16) << 4
        if kind == Q.Q4_0 or kind == Q.Q5_0:
            return _op(b[:, :2].view(np.float16), q - (16 if five else 8), ar, mul).reshape(-1)
        return _op(_op(b[:, :2].view(np.float16), q, ar, mul), b[:, 2:4].view(np.float16), ar, np.add).reshape(-1)
    if kind == Q.Q6_K:
        low = (b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 15
        high = (b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
        q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).astype(np.int8) - 32
        scale = _op(b[:, 208:210].view(np.float16), b[:, 192:208].view(np.int8), ar, mul)
        return _op(scale[..., None], q.reshape(n, 16, 16), ar, mul).reshape(-1)
    if kind in (Q.Q4_K, Q.Q5_K):
        sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])
        q = ((b[:, -128:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]) & 15).reshape(n, 8, 32)
        if kind == Q.Q5_K:
            q = q | (((b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
        scale = _op(b[:, :2].view(np.float16), sc, ar, mul)[..., None]
        low = _op(b[:, 2:4].view(np.float16), m, ar, mul)[..., None]
        return _op(_op(scale, q, ar, mul), low, ar, sub).reshape(-1)
    raise NotImplementedError(f"{kind.name} is not written by this helper")


def orig_shapes(reader: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape as ComfyUI-GGUF's loader gives it (``comfy.gguf.orig_shape.<key>`` where present)."""
    shapes = {}
    for t in reader.tensors:
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        shapes[t.name] = (tuple(int(field.parts[i][0]) for i in field.data) if field is not None
                          else tuple(int(v) for v in reversed(t.shape)))
    return shapes


def runtime_state_dict(path, dtype: torch.dtype = torch.float32,
                       dequant_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors as ComfyUI-GGUF's layers compute with them in ``dtype``: ``dequantize_tensor(t, dtype,
    dequant_dtype)`` with the loader's ``dequant_dtype`` (None, torch.float16 or torch.float32)."""
    ar = {None: np.float16, torch.float16: np.float16, torch.float32: F32}[dequant_dtype]
    reader = gguf.GGUFReader(str(path))
    shapes = orig_shapes(reader)
    out = {}
    for t in reader.tensors:
        kind = Q(int(t.tensor_type))
        values = np.asarray(t.data) if kind in (Q.F32, Q.F16) else dequantize(np.asarray(t.data), kind, ar)
        out[t.name] = torch.from_numpy(np.array(values).reshape(shapes[t.name])).to(dtype)
    return out


def _self_check() -> None:
    """K-quant bytes against gguf's dequantizer; every type's file read back; fp16 arithmetic against float32."""
    import os
    import tempfile

    gen = np.random.default_rng(0)
    torch.manual_seed(0)
    for kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        x = gen.standard_normal((64, 256)).astype(F32) * np.exp(gen.standard_normal((64, 1))).astype(F32)
        d, dmin, sc, m, q = quantize_k(x, kind)
        mine = (d.astype(F32) * sc.astype(F32))[..., None] * q.astype(F32)
        mine = (mine - ((dmin.astype(F32) * m.astype(F32))[..., None] if dmin is not None else 0)).reshape(64, 256)
        theirs = gguf.quants.dequantize(pack_k(d, dmin, sc, m, q, kind), kind)
        rel = np.linalg.norm(theirs - x) / np.linalg.norm(x)
        print(f"{kind.name}: max |dequant(pack(x)) - gguf dequant| = {np.abs(mine - theirs).max():.1e}, "
              f"relative quantization error {rel:.4f}")
    sd = {"input_blocks.1.0.in_layers.2.weight": torch.randn(320, 320, 3, 3), "out.2.weight": torch.randn(4, 320, 3, 3),
          "time_embed.0.weight": torch.randn(1280, 320), "attn.to_k.weight": torch.randn(320, 768),
          "norm.weight": torch.randn(320), "tiny.weight": torch.randn(8, 16)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in QTYPES:
            path = os.path.join(tmp, f"{name}.gguf")
            written = write_gguf(path, sd, name, "sd1")
            reader = gguf.GGUFReader(path)
            raw = [(np.asarray(t.data), Q(int(t.tensor_type))) for t in reader.tensors]
            exact = max(float(np.abs(dequantize(r, k, F32) - gguf.quants.dequantize(r, k).reshape(-1)).max())
                        for r, k in raw)
            runtime, fp32 = runtime_state_dict(path), runtime_state_dict(path, dequant_dtype=torch.float32)
            assert all(runtime[k].shape == v.shape for k, v in sd.items())
            fp16 = max(float((runtime[k] - fp32[k]).abs().max()) for k in sd)
            error = max(float((fp32[k] - v).norm() / v.norm()) for k, v in sd.items())
            print(f"{name:5s}: {sorted(set(written.values()))}, {len(reader.fields)} fields; float32 unpack vs gguf "
                  f"{exact:.1e}; fp16 vs fp32 arithmetic {fp16:.1e}; relative error {error:.4f}")


if __name__ == "__main__":
    _self_check()
