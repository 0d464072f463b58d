//! Dequantisation of ggml block formats to f32.
//!
//! Each block function is a transcription of the matching `dequantize_row_*` in llama.cpp's
//! `ggml-quants.c`, with the same order of float operations, so results match ggml's reference
//! (non-SIMD) path and, exactly, the `gguf` Python package (see the tests). Blocks are handed
//! over as fixed-size arrays: after the one length check in [`dequantize`], no index can depend
//! on the input.

use crate::error::DequantError;
use crate::types::GgmlType;

/// Elements per K-quant super-block (`QK_K`).
const QK_K: usize = 256;

/// Dequantise `n_elements` values of `dtype` from `data`, which must hold exactly the whole
/// blocks those elements occupy. Integer types (I8..I64) are converted, F64 is rounded.
pub fn dequantize(
    dtype: GgmlType,
    data: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, DequantError> {
    let kernel = kernel(dtype).ok_or(DequantError::Unsupported(dtype))?;
    check_length(dtype, data, n_elements)?;
    let mut out = vec![0f32; n_elements];
    kernel(data, &mut out);
    Ok(out)
}

/// Whether [`dequantize`] handles `dtype`.
pub(crate) fn supported(dtype: GgmlType) -> bool {
    kernel(dtype).is_some()
}

/// Converts a buffer of whole blocks into the matching output slice.
type Kernel = fn(&[u8], &mut [f32]);

/// The kernel for `dtype`; the one place that says which types are supported.
fn kernel(dtype: GgmlType) -> Option<Kernel> {
    Some(match dtype {
        GgmlType::F32 => |x, y| each_block(x, y, plain_f32),
        GgmlType::F16 => |x, y| each_block(x, y, plain_f16),
        GgmlType::BF16 => |x, y| each_block(x, y, plain_bf16),
        GgmlType::F64 => |x, y| each_block(x, y, plain_f64),
        GgmlType::I8 => |x, y| each_block(x, y, plain_i8),
        GgmlType::I16 => |x, y| each_block(x, y, plain_i16),
        GgmlType::I32 => |x, y| each_block(x, y, plain_i32),
        GgmlType::I64 => |x, y| each_block(x, y, plain_i64),
        GgmlType::Q4_0 => |x, y| each_block(x, y, q4_0),
        GgmlType::Q4_1 => |x, y| each_block(x, y, q4_1),
        GgmlType::Q5_0 => |x, y| each_block(x, y, q5_0),
        GgmlType::Q5_1 => |x, y| each_block(x, y, q5_1),
        GgmlType::Q8_0 => |x, y| each_block(x, y, q8_0),
        GgmlType::Q2K => |x, y| each_block(x, y, q2_k),
        GgmlType::Q3K => |x, y| each_block(x, y, q3_k),
        GgmlType::Q4K => |x, y| each_block(x, y, q4_k),
        GgmlType::Q5K => |x, y| each_block(x, y, q5_k),
        GgmlType::Q6K => |x, y| each_block(x, y, q6_k),
        GgmlType::Q8K => |x, y| each_block(x, y, q8_k),
        // Q8_1 is an activation format never stored in files; the rest need lattice tables
        // (IQ*) or formats no model we load uses.
        GgmlType::Q8_1
        | GgmlType::IQ2XXS
        | GgmlType::IQ2XS
        | GgmlType::IQ3XXS
        | GgmlType::IQ1S
        | GgmlType::IQ4NL
        | GgmlType::IQ3S
        | GgmlType::IQ2S
        | GgmlType::IQ4XS
        | GgmlType::IQ1M
        | GgmlType::TQ1_0
        | GgmlType::TQ2_0
        | GgmlType::MXFP4
        | GgmlType::NVFP4
        | GgmlType::Q1_0
        | GgmlType::Other(_) => return None,
    })
}

/// Refuses types of unknown size, partial blocks and a buffer that is not exactly the right size;
/// after this, [`each_block`] sees whole blocks and a matching output.
fn check_length(dtype: GgmlType, data: &[u8], n_elements: usize) -> Result<(), DequantError> {
    let (Some(block_size), Some(type_size)) = (dtype.block_size(), dtype.type_size()) else {
        return Err(DequantError::Unsupported(dtype));
    };
    if !n_elements.is_multiple_of(block_size) {
        return Err(DequantError::PartialBlock {
            dtype,
            n_elements,
            block_size,
        });
    }
    let n_blocks = n_elements / block_size;
    if n_blocks.checked_mul(type_size) != Some(data.len()) {
        return Err(DequantError::WrongLength {
            dtype,
            n_elements,
            expected: n_blocks.saturating_mul(type_size),
            got: data.len(),
        });
    }
    Ok(())
}

/// Runs `f` over matching input blocks of `B` bytes and output blocks of `N` values.
/// `B` and `N` must be the type's `type_size` and `block_size`; the tests against reference
/// values catch a mismatch, since it would misalign every block after the first.
fn each_block<const B: usize, const N: usize>(
    data: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; B], &mut [f32; N]),
) {
    let (blocks, _) = data.as_chunks::<B>();
    let (outs, _) = out.as_chunks_mut::<N>();
    for (block, y) in blocks.iter().zip(outs) {
        f(block, y);
    }
}

fn f16(b: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(b).to_f32()
}

fn bf16(b: [u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
}

fn plain_f32(b: &[u8; 4], y: &mut [f32; 1]) {
    y[0] = f32::from_le_bytes(*b);
}

fn plain_f16(b: &[u8; 2], y: &mut [f32; 1]) {
    y[0] = f16(*b);
}

fn plain_bf16(b: &[u8; 2], y: &mut [f32; 1]) {
    y[0] = bf16(*b);
}

fn plain_f64(b: &[u8; 8], y: &mut [f32; 1]) {
    y[0] = f64::from_le_bytes(*b) as f32;
}

fn plain_i8(b: &[u8; 1], y: &mut [f32; 1]) {
    y[0] = f32::from(i8::from_le_bytes(*b));
}

fn plain_i16(b: &[u8; 2], y: &mut [f32; 1]) {
    y[0] = f32::from(i16::from_le_bytes(*b));
}

fn plain_i32(b: &[u8; 4], y: &mut [f32; 1]) {
    y[0] = i32::from_le_bytes(*b) as f32;
}

fn plain_i64(b: &[u8; 8], y: &mut [f32; 1]) {
    y[0] = i64::from_le_bytes(*b) as f32;
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16([b[i], b[i + 1]])
}

/// `block_q4_0`: f16 d, 16 bytes; byte j holds element j (low nibble) and j+16 (high nibble).
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    for ((q, y0), y1) in b[2..].iter().zip(lo).zip(hi) {
        *y0 = (i32::from(q & 0x0F) - 8) as f32 * d;
        *y1 = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

/// `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles laid out as in Q4_0; value = q*d + m.
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let (lo, hi) = y.split_at_mut(16);
    for ((q, y0), y1) in b[4..].iter().zip(lo).zip(hi) {
        *y0 = f32::from(q & 0x0F) * d + m;
        *y1 = f32::from(q >> 4) * d + m;
    }
}

/// The fifth bits of a Q5 block: element j's is bit j of `qh`, element j+16's is bit j+16.
fn q5_high_bits(qh: u32, j: usize) -> (u8, u8) {
    let h0 = ((qh >> j) << 4) & 0x10;
    let h1 = (qh >> (j + 12)) & 0x10;
    (h0 as u8, h1 as u8)
}

/// `block_q5_0`: f16 d, u32 qh, 16 bytes of nibbles; value = (q - 16) * d.
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, ((q, y0), y1)) in b[6..].iter().zip(lo).zip(hi).enumerate() {
        let (h0, h1) = q5_high_bits(qh, j);
        *y0 = (i32::from((q & 0x0F) | h0) - 16) as f32 * d;
        *y1 = (i32::from((q >> 4) | h1) - 16) as f32 * d;
    }
}

/// `block_q5_1`: f16 d, f16 m, u32 qh, 16 bytes of nibbles; value = q*d + m.
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, ((q, y0), y1)) in b[8..].iter().zip(lo).zip(hi).enumerate() {
        let (h0, h1) = q5_high_bits(qh, j);
        *y0 = f32::from((q & 0x0F) | h0) * d + m;
        *y1 = f32::from((q >> 4) | h1) * d + m;
    }
}

/// `block_q8_0`: f16 d, 32 i8; value = q*d.
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (q, y) in b[2..].iter().zip(y) {
        *y = f32::from(*q as i8) * d;
    }
}

/// `block_q2_K`: 16 scale bytes (low nibble scale, high nibble min, one per 16 values), 64 bytes
/// of 2-bit values, f16 d, f16 dmin.
fn q2_k(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (n, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(128)).enumerate() {
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let shift = 2 * j;
            for (half, y) in y.chunks_exact_mut(16).enumerate() {
                let sc = scales[8 * n + 2 * j + half];
                let dl = d * f32::from(sc & 0x0F);
                let ml = dmin * f32::from(sc >> 4);
                for (q, y) in q[16 * half..].iter().zip(y) {
                    *y = dl * f32::from((q >> shift) & 3) - ml;
                }
            }
        }
    }
}

/// The sixteen 6-bit Q3_K scales, unpacked from 12 bytes as ggml does with its `kmask` words.
fn q3_k_scales(packed: &[u8]) -> [i8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let word =
        |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (a0, a1, tmp) = (word(0), word(4), word(8));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut scales = [0i8; 16];
    for (out, byte) in scales
        .iter_mut()
        .zip(aux.iter().flat_map(|w| w.to_le_bytes()))
    {
        *out = byte as i8;
    }
    scales
}

/// `block_q3_K`: 32 bytes of high bits (hmask), 64 bytes of low 2 bits, 12 bytes of packed
/// 6-bit scales, f16 d. A clear high bit subtracts 4.
fn q3_k(b: &[u8; 110], y: &mut [f32; QK_K]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d_all = f16_at(b, 108);
    for (n, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(128)).enumerate() {
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let shift = 2 * j;
            let m = 1u8 << (4 * n + j);
            for (half, y) in y.chunks_exact_mut(16).enumerate() {
                let dl = d_all * f32::from(i16::from(scales[8 * n + 2 * j + half]) - 32);
                let lanes = 16 * half..16 * half + 16;
                for ((q, h), y) in q[lanes.clone()].iter().zip(&hmask[lanes]).zip(y) {
                    let low = i16::from((q >> shift) & 3);
                    let high = if h & m != 0 { 0 } else { 4 };
                    *y = dl * f32::from(low - high);
                }
            }
        }
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K / Q5_K
/// (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K`: f16 d, f16 dmin, 12 bytes of packed scales/mins, 128 bytes of nibbles. Each
/// 32-byte run holds 64 values: the low nibbles first, then the high nibbles.
fn q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (g, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (lo, hi) = y.split_at_mut(32);
        for ((q, y0), y1) in q.iter().zip(lo).zip(hi) {
            *y0 = d1 * f32::from(q & 0x0F) - min1;
            *y1 = d2 * f32::from(q >> 4) - min2;
        }
    }
}

/// `block_q5_K`: as Q4_K plus 32 bytes of fifth bits; group g's low nibbles take bit 2g of
/// `qh[l]`, its high nibbles bit 2g+1.
fn q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (g, (ql, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
        let (lo, hi) = y.split_at_mut(32);
        for (((q, h), y0), y1) in ql.iter().zip(qh).zip(lo).zip(hi) {
            let h0 = if h & u1 != 0 { 16 } else { 0 };
            let h1 = if h & u2 != 0 { 16 } else { 0 };
            *y0 = d1 * f32::from((q & 0x0F) + h0) - min1;
            *y1 = d2 * f32::from((q >> 4) + h1) - min2;
        }
    }
}

/// `block_q6_K`: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 i8 scales, f16 d.
/// Each half (128 values) uses 64 `ql`, 32 `qh` and 8 scales, in four interleaved runs of 32.
fn q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    let halves = ql
        .chunks_exact(64)
        .zip(qh.chunks_exact(32))
        .zip(sc.chunks_exact(8));
    for (((ql, qh), sc), y) in halves.zip(y.chunks_exact_mut(128)) {
        let scale = |i: usize| d * f32::from(sc[i] as i8);
        for l in 0..32 {
            let is = l / 16;
            let q1 = i16::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i16::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i16::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i16::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = scale(is) * f32::from(q1);
            y[l + 32] = scale(is + 2) * f32::from(q2);
            y[l + 64] = scale(is + 4) * f32::from(q3);
            y[l + 96] = scale(is + 6) * f32::from(q4);
        }
    }
}

/// `block_q8_K`: f32 d, 256 i8, then 16 i16 block sums that only the dot product uses.
fn q8_k(b: &[u8; 292], y: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (q, y) in b[4..260].iter().zip(y) {
        *y = d * f32::from(*q as i8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_le_bytes()
    }

    /// The same generator as the Python script that produced the reference numbers below
    /// (PCG constants; byte = bits 33..41 of the state).
    fn lcg_bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    /// Two blocks of pseudo-random bytes whose f16 scale fields (at `fields` within each block)
    /// are overwritten with 0.5, -0.25, 0.125, 0.0625 in turn, so every value is finite and
    /// exactly representable.
    fn reference_blocks(dtype: GgmlType, fields: &[usize]) -> Vec<u8> {
        let ts = dtype.type_size().unwrap();
        let mut b = lcg_bytes(42 + u64::from(dtype.id()), 2 * ts);
        let scales = [0x3800u16, 0xB400, 0x3000, 0x2C00];
        let mut k = 0;
        for blk in 0..2 {
            for &off in fields {
                let at = blk * ts + off;
                b[at..at + 2].copy_from_slice(&scales[k % 4].to_le_bytes());
                k += 1;
            }
        }
        b
    }

    /// Checks the sum, a position-weighted sum (catches permuted outputs) and a few values
    /// against numbers from `gguf.quants.dequantize` (gguf-py 0.19.0) on the same bytes.
    fn check_against_python(
        dtype: GgmlType,
        fields: &[usize],
        sum: f64,
        wsum: f64,
        values: &[(usize, f32)],
    ) {
        let data = reference_blocks(dtype, fields);
        let n = 2 * dtype.block_size().unwrap();
        let v = dequantize(dtype, &data, n).unwrap();
        let got_sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
        let got_wsum: f64 = v
            .iter()
            .enumerate()
            .map(|(i, &x)| f64::from(x) * ((i % 13) as f64 - 6.0))
            .sum();
        assert_eq!(got_sum, sum, "{dtype} sum");
        assert_eq!(got_wsum, wsum, "{dtype} weighted sum");
        for &(i, want) in values {
            assert_eq!(v[i], want, "{dtype} element {i}");
        }
    }

    #[test]
    fn plain_types_convert_exactly() {
        let f32s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::F32, &f32s, 2).unwrap(), [1.5, -2.0]);
        let f16s: Vec<u8> = [0.333f32, -65504.0]
            .iter()
            .flat_map(|&v| f16_bytes(v))
            .collect();
        let got = dequantize(GgmlType::F16, &f16s, 2).unwrap();
        assert_eq!(got, [half::f16::from_f32(0.333).to_f32(), -65504.0]);
        // bf16 is the top half of an f32: 0x3FC0 -> 1.5, 0xC020 -> -2.5.
        let bf16s = [0xC0u8, 0x3F, 0x20, 0xC0];
        assert_eq!(dequantize(GgmlType::BF16, &bf16s, 2).unwrap(), [1.5, -2.5]);
        assert_eq!(
            dequantize(GgmlType::I8, &[0xFF, 3], 2).unwrap(),
            [-1.0, 3.0]
        );
        let i32s: Vec<u8> = [-7i32, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::I32, &i32s, 2).unwrap(), [-7.0, 9.0]);
        assert_eq!(
            dequantize(GgmlType::F64, &0.25f64.to_le_bytes(), 1).unwrap(),
            [0.25]
        );
    }

    #[test]
    fn q8_0_is_q_times_d() {
        let mut b = f16_bytes(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let want: Vec<f32> = (0..32).map(|i| (i - 16) as f32 * 0.5).collect();
        assert_eq!(dequantize(GgmlType::Q8_0, &b, 32).unwrap(), want);
    }

    #[test]
    fn q4_0_low_nibbles_first_then_high() {
        // byte j = (15 - j % 16) << 4 | j: element j is j - 8, element j+16 is 7 - j.
        let mut b = f16_bytes(2.0).to_vec();
        b.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
        let v = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(v[j + 16], (7.0 - j as f32) * 2.0);
        }
    }

    #[test]
    fn q4_1_hand_computed_block() {
        // d = 0.5, m = -1; byte j = j | (15-j) << 4: element j = 0.5*j - 1,
        // element j+16 = 0.5*(15-j) - 1.
        let mut b = f16_bytes(0.5).to_vec();
        b.extend(f16_bytes(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(&v[..4], &[-1.0, -0.5, 0.0, 0.5]);
        assert_eq!(v[15], 6.5);
        assert_eq!(v[16], 6.5);
        assert_eq!(v[31], -1.0);
    }

    #[test]
    fn q5_0_high_bits_come_from_qh() {
        // All nibbles 0; qh sets bit 0 (element 0) and bit 16 (element 16) and bit 31.
        let mut b = f16_bytes(1.0).to_vec();
        b.extend((1u32 | 1 << 16 | 1 << 31).to_le_bytes());
        b.extend([0u8; 16]);
        let v = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        assert_eq!(v[0], 0.0); // 16 - 16
        assert_eq!(v[1], -16.0);
        assert_eq!(v[16], 0.0);
        assert_eq!(v[31], 0.0);
        assert_eq!(v[30], -16.0);
    }

    #[test]
    fn q8_k_is_f32_d_times_q() {
        let mut b = 0.25f32.to_le_bytes().to_vec();
        b.extend((0..256).map(|i| (i as u8).wrapping_sub(128)));
        b.extend([0u8; 32]);
        let v = dequantize(GgmlType::Q8K, &b, 256).unwrap();
        assert_eq!(v[0], -32.0);
        assert_eq!(v[255], 31.75);
    }

    #[test]
    fn legacy_quants_match_gguf_py() {
        check_against_python(
            GgmlType::Q4_0,
            &[0],
            -5.5,
            164.75,
            &[
                (0, 0.5),
                (1, -2.5),
                (17, -4.0),
                (31, -0.5),
                (37, 0.25),
                (63, 2.0),
            ],
        );
        check_against_python(
            GgmlType::Q4_1,
            &[0, 2],
            130.75,
            -84.9375,
            &[
                (0, 6.25),
                (1, 1.75),
                (17, 0.25),
                (31, 1.25),
                (37, 0.6875),
                (63, 1.1875),
            ],
        );
        check_against_python(
            GgmlType::Q5_0,
            &[0],
            2.25,
            2.25,
            &[
                (0, 3.5),
                (1, 2.0),
                (17, -2.5),
                (31, -2.0),
                (37, 2.5),
                (63, -0.5),
            ],
        );
        check_against_python(
            GgmlType::Q5_1,
            &[0, 2],
            318.75,
            -309.3125,
            &[
                (0, 3.75),
                (1, 11.75),
                (17, 4.25),
                (31, 14.25),
                (37, 2.3125),
                (63, 1.8125),
            ],
        );
        check_against_python(
            GgmlType::Q8_0,
            &[0],
            -443.75,
            1412.25,
            &[
                (0, -41.0),
                (1, -41.0),
                (17, -53.5),
                (31, -20.0),
                (37, -17.75),
                (63, -1.0),
            ],
        );
    }

    #[test]
    fn q2_k_and_q3_k_match_gguf_py() {
        check_against_python(
            GgmlType::Q2K,
            &[80, 82],
            1904.75,
            -466.75,
            &[
                (0, 1.25),
                (1, 10.25),
                (17, 13.75),
                (255, 4.0),
                (261, 3.25),
                (511, 0.8125),
            ],
        );
        check_against_python(
            GgmlType::Q3K,
            &[108],
            -274.0,
            494.25,
            &[
                (0, 10.5),
                (1, 10.5),
                (17, 9.5),
                (255, 3.0),
                (261, 13.5),
                (511, -0.5),
            ],
        );
    }

    #[test]
    fn q4_k_matches_gguf_py() {
        check_against_python(
            GgmlType::Q4K,
            &[0, 2],
            38274.625,
            -4468.1875,
            &[
                (0, 242.25),
                (1, 60.25),
                (17, 320.25),
                (255, 177.5),
                (261, 9.4375),
                (511, 113.75),
            ],
        );
    }

    #[test]
    fn q5_k_matches_gguf_py() {
        check_against_python(
            GgmlType::Q5K,
            &[0, 2],
            58834.75,
            -14198.0,
            &[
                (0, 109.5),
                (1, 192.0),
                (17, 406.5),
                (255, 24.0),
                (261, 80.125),
                (511, 21.5),
            ],
        );
    }

    #[test]
    fn q6_k_matches_gguf_py() {
        check_against_python(
            GgmlType::Q6K,
            &[208],
            -4123.0,
            -70065.25,
            &[
                (0, 105.0),
                (1, -1120.0),
                (17, 51.0),
                (255, 137.5),
                (261, 267.75),
                (511, -351.0),
            ],
        );
    }

    #[test]
    fn bad_lengths_and_types_are_refused() {
        assert_eq!(
            dequantize(GgmlType::Q4_0, &[0; 18], 16)
                .unwrap_err()
                .to_string(),
            "16 elements is not a whole number of Q4_0 blocks of 32"
        );
        assert_eq!(
            dequantize(GgmlType::Q4_0, &[0; 17], 32)
                .unwrap_err()
                .to_string(),
            "32 elements of Q4_0 take 18 bytes, but 17 bytes were given"
        );
        assert_eq!(
            dequantize(GgmlType::IQ2XXS, &[0; 66], 256)
                .unwrap_err()
                .to_string(),
            "dequantisation of type IQ2_XXS is not supported"
        );
        assert!(dequantize(GgmlType::Other(99), &[], 0).is_err());
        assert_eq!(
            dequantize(GgmlType::Q6K, &[], 0).unwrap(),
            Vec::<f32>::new()
        );
    }
}
