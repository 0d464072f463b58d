//! The GGUF header parser: magic, version, counts, metadata and tensor directory.
//!
//! A GGUF file is attacker-controlled input as far as this code is concerned (models are
//! downloaded from anywhere), so every length and count read from it is checked against a fixed
//! cap and against the bytes actually left in the file *before* anything is allocated, array
//! nesting is bounded so recursion cannot exhaust the stack, and all offset arithmetic is checked.
//! The caps are generous multiples of what real models need (the largest vocabularies have ~256k
//! tokens; chat templates are a few kilobytes).

use std::collections::{BTreeMap, HashSet};
use std::io::{ErrorKind, Read};

use crate::error::{GgufError, Result};
use crate::metadata::{MetadataValue, min_encoded_size, type_id, type_id_name};
use crate::types::GgmlType;
use crate::{MAGIC, TensorInfo};

/// Longest string (key, value, tensor name) accepted.
pub const MAX_STRING_LEN: u64 = 1 << 20;
/// Most elements in one metadata array.
pub const MAX_ARRAY_LEN: u64 = 16 << 20;
/// Most array elements in the whole header (real models have ~1.5M: tokens, scores, types,
/// merges). A `MetadataValue` is 32 bytes in memory whatever its on-disk size, so without this
/// a file of many u8 arrays would cost 32 times its size; with it, at most 512 MiB.
pub const MAX_TOTAL_ARRAY_ELEMENTS: u64 = 16 << 20;
/// Most entries reserved up front for a count read from the file; beyond this the vector grows
/// as entries are actually read, so a count that passed the length checks still cannot make us
/// allocate ahead of the bytes that back it.
const MAX_PREALLOC: u64 = 1 << 16;
/// Deepest array nesting: an array of arrays is allowed, an array of arrays of arrays is not.
pub const MAX_ARRAY_DEPTH: u32 = 2;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Alignment of the data section when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Smallest encoding of one metadata entry (empty key, type id, one-byte value) and of one
/// tensor-directory entry (empty name, n_dims, type, offset): the counts in the fixed header
/// are checked against these before any entry is read.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// What is being read, so an error can name the key or tensor it concerns.
#[derive(Clone, Copy)]
enum Ctx<'a> {
    /// A part of the header with no key or tensor name (yet).
    Header(&'a str),
    Key(&'a str),
    Tensor(&'a str),
}

/// Everything the header says; [`crate::GgufFile`] adds where it came from.
pub(crate) struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, MetadataValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

pub(crate) struct Parser<'f, R> {
    reader: R,
    file: &'f str,
    pos: u64,
    len: u64,
    array_elements: u64,
}

impl<'f, R: Read> Parser<'f, R> {
    /// `reader` must be positioned at the start of the file, which is `len` bytes long.
    pub fn new(reader: R, file: &'f str, len: u64) -> Self {
        Parser {
            reader,
            file,
            pos: 0,
            len,
            array_elements: 0,
        }
    }

    pub fn parse(mut self) -> Result<Header> {
        let version = self.read_preamble()?;
        let tensor_count = self.read_count("tensor count", MIN_TENSOR_INFO_BYTES)?;
        let kv_count = self.read_count("metadata entry count", MIN_KV_BYTES)?;
        let metadata = self.read_metadata(kv_count)?;
        let alignment = alignment(self.file, &metadata)?;
        let tensors = self.read_tensor_infos(tensor_count)?;
        let data_offset = self
            .pos
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| GgufError::InvalidHeader {
                file: self.file.to_owned(),
                reason: format!("header end {} cannot be aligned to {alignment}", self.pos),
            })?;
        Ok(Header {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    fn read_preamble(&mut self) -> Result<u32> {
        let magic: [u8; 4] = self.bytes(Ctx::Header("magic"))?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                file: self.file.to_owned(),
                found: magic.escape_ascii().to_string(),
            });
        }
        let version = u32::from_le_bytes(self.bytes(Ctx::Header("version"))?);
        if version == 2 || version == 3 {
            return Ok(version);
        }
        let hint = if version == 1 {
            "; v1 files (2023) used 32-bit counts: re-convert the model with a current llama.cpp"
        } else if matches!(version.swap_bytes(), 2 | 3) {
            "; this looks like a big-endian GGUF, which this reader does not support"
        } else {
            ""
        };
        Err(GgufError::UnsupportedVersion {
            file: self.file.to_owned(),
            version,
            hint,
        })
    }

    /// A count from the fixed header, refused if that many entries of at least `min_entry`
    /// bytes each cannot fit in the rest of the file.
    fn read_count(&mut self, what: &str, min_entry: u64) -> Result<u64> {
        let count = self.u64(Ctx::Header(what))?;
        let remaining = self.remaining();
        if count.checked_mul(min_entry).is_none_or(|n| n > remaining) {
            return Err(GgufError::InvalidHeader {
                file: self.file.to_owned(),
                reason: format!(
                    "{what} is {count}, but the {remaining} bytes after it hold at most {}",
                    remaining / min_entry
                ),
            });
        }
        Ok(count)
    }

    fn read_metadata(&mut self, kv_count: u64) -> Result<BTreeMap<String, MetadataValue>> {
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = self.string(Ctx::Header(&format!("metadata entry {i} (key)")))?;
            let ctx = Ctx::Key(&key);
            let ty = self.u32(ctx)?;
            let value = self.value(ctx, ty, 0)?;
            if metadata.contains_key(&key) {
                return Err(GgufError::DuplicateKey {
                    file: self.file.to_owned(),
                    key,
                });
            }
            metadata.insert(key, value);
        }
        Ok(metadata)
    }

    fn read_tensor_infos(&mut self, tensor_count: u64) -> Result<Vec<TensorInfo>> {
        let mut tensors = Vec::with_capacity(prealloc(tensor_count));
        let mut names = HashSet::new();
        for i in 0..tensor_count {
            let name = self.string(Ctx::Header(&format!("tensor entry {i} (name)")))?;
            let info = self.read_tensor_info(name)?;
            if !names.insert(info.name.clone()) {
                return Err(GgufError::DuplicateTensor {
                    file: self.file.to_owned(),
                    tensor: info.name,
                });
            }
            tensors.push(info);
        }
        Ok(tensors)
    }

    fn read_tensor_info(&mut self, name: String) -> Result<TensorInfo> {
        let ctx = Ctx::Tensor(&name);
        let n_dims = self.u32(ctx)?;
        if n_dims > MAX_DIMS {
            return Err(self.invalid(
                ctx,
                format!("has {n_dims} dimensions; ggml allows at most {MAX_DIMS}"),
            ));
        }
        let mut dims = Vec::with_capacity(MAX_DIMS as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(ctx)?);
        }
        let dtype = GgmlType::from_id(self.u32(ctx)?);
        let offset = self.u64(ctx)?;
        Ok(TensorInfo {
            name,
            dims,
            dtype,
            offset,
        })
    }

    /// One metadata value of on-disk type `ty`; `depth` is how many arrays enclose it.
    fn value(&mut self, ctx: Ctx<'_>, ty: u32, depth: u32) -> Result<MetadataValue> {
        Ok(match ty {
            type_id::U8 => MetadataValue::U8(u8::from_le_bytes(self.bytes(ctx)?)),
            type_id::I8 => MetadataValue::I8(i8::from_le_bytes(self.bytes(ctx)?)),
            type_id::U16 => MetadataValue::U16(u16::from_le_bytes(self.bytes(ctx)?)),
            type_id::I16 => MetadataValue::I16(i16::from_le_bytes(self.bytes(ctx)?)),
            type_id::U32 => MetadataValue::U32(self.u32(ctx)?),
            type_id::I32 => MetadataValue::I32(i32::from_le_bytes(self.bytes(ctx)?)),
            type_id::U64 => MetadataValue::U64(self.u64(ctx)?),
            type_id::I64 => MetadataValue::I64(i64::from_le_bytes(self.bytes(ctx)?)),
            type_id::F32 => MetadataValue::F32(f32::from_le_bytes(self.bytes(ctx)?)),
            type_id::F64 => MetadataValue::F64(f64::from_le_bytes(self.bytes(ctx)?)),
            type_id::BOOL => self.bool(ctx)?,
            type_id::STRING => MetadataValue::String(self.string(ctx)?),
            type_id::ARRAY => self.array(ctx, depth + 1)?,
            unknown => return Err(self.invalid(ctx, format!("unknown value type {unknown}"))),
        })
    }

    fn bool(&mut self, ctx: Ctx<'_>) -> Result<MetadataValue> {
        match u8::from_le_bytes(self.bytes(ctx)?) {
            0 => Ok(MetadataValue::Bool(false)),
            1 => Ok(MetadataValue::Bool(true)),
            other => Err(self.invalid(ctx, format!("bool byte is {other}, expected 0 or 1"))),
        }
    }

    /// An array at nesting level `depth` (1 for a top-level array).
    fn array(&mut self, ctx: Ctx<'_>, depth: u32) -> Result<MetadataValue> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.invalid(
                ctx,
                format!("arrays are nested more than {MAX_ARRAY_DEPTH} deep"),
            ));
        }
        let elem_ty = self.u32(ctx)?;
        let count = self.u64(ctx)?;
        let Some(min_size) = min_encoded_size(elem_ty) else {
            return Err(self.invalid(ctx, format!("unknown array element type {elem_ty}")));
        };
        self.check_array_len(ctx, elem_ty, count, min_size)?;
        let mut items = Vec::with_capacity(prealloc(count));
        for _ in 0..count {
            items.push(self.value(ctx, elem_ty, depth)?);
        }
        Ok(MetadataValue::Array(items))
    }

    fn check_array_len(
        &mut self,
        ctx: Ctx<'_>,
        elem_ty: u32,
        count: u64,
        min_size: u64,
    ) -> Result<()> {
        let elem = type_id_name(elem_ty);
        if count > MAX_ARRAY_LEN {
            return Err(self.invalid(
                ctx,
                format!("array of {count} {elem} exceeds the limit of {MAX_ARRAY_LEN} elements"),
            ));
        }
        self.array_elements = self.array_elements.saturating_add(count);
        if self.array_elements > MAX_TOTAL_ARRAY_ELEMENTS {
            return Err(self.invalid(
                ctx,
                format!(
                    "metadata arrays hold more than {MAX_TOTAL_ARRAY_ELEMENTS} elements in all"
                ),
            ));
        }
        // count <= MAX_ARRAY_LEN and min_size <= 12, so this cannot overflow.
        let needed = count.saturating_mul(min_size);
        if needed > self.remaining() {
            return Err(self.truncated(ctx, needed));
        }
        Ok(())
    }

    /// A u64-length-prefixed UTF-8 string.
    fn string(&mut self, ctx: Ctx<'_>) -> Result<String> {
        let len = self.u64(ctx)?;
        if len > MAX_STRING_LEN {
            return Err(self.invalid(
                ctx,
                format!("string length {len} exceeds the limit of {MAX_STRING_LEN} bytes"),
            ));
        }
        if len > self.remaining() {
            return Err(self.truncated(ctx, len));
        }
        // len <= MAX_STRING_LEN, so it fits in usize.
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.read_exact(ctx, &mut buf)?;
        String::from_utf8(buf).map_err(|e| {
            let valid = e.utf8_error().valid_up_to();
            self.invalid(
                ctx,
                format!("string is not valid UTF-8 (bad byte at index {valid})"),
            )
        })
    }

    fn u32(&mut self, ctx: Ctx<'_>) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(ctx)?))
    }

    fn u64(&mut self, ctx: Ctx<'_>) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(ctx)?))
    }

    fn bytes<const N: usize>(&mut self, ctx: Ctx<'_>) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.read_exact(ctx, &mut buf)?;
        Ok(buf)
    }

    /// Reads exactly `buf.len()` bytes, checking first against the known file length so a short
    /// file gives a "truncated" error with positions rather than a bare I/O error.
    fn read_exact(&mut self, ctx: Ctx<'_>, buf: &mut [u8]) -> Result<()> {
        let n = buf.len() as u64;
        if n > self.remaining() {
            return Err(self.truncated(ctx, n));
        }
        match self.reader.read_exact(buf) {
            Ok(()) => {
                self.pos += n;
                Ok(())
            }
            // The stream is shorter than its length said (a file shrinking under us).
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(self.truncated(ctx, n)),
            Err(error) => Err(GgufError::Io {
                file: self.file.to_owned(),
                context: format!("reading {} at byte {}", describe(ctx), self.pos),
                error,
            }),
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self, ctx: Ctx<'_>, needed: u64) -> GgufError {
        GgufError::Truncated {
            file: self.file.to_owned(),
            what: describe(ctx),
            at: self.pos,
            needed,
            len: self.len,
        }
    }

    fn invalid(&self, ctx: Ctx<'_>, reason: String) -> GgufError {
        let file = self.file.to_owned();
        match ctx {
            Ctx::Header(what) => GgufError::InvalidHeader {
                file,
                reason: format!("{what}: {reason}"),
            },
            Ctx::Key(key) => GgufError::InvalidMetadata {
                file,
                key: key.to_owned(),
                reason,
            },
            Ctx::Tensor(tensor) => GgufError::InvalidTensor {
                file,
                tensor: tensor.to_owned(),
                reason,
            },
        }
    }
}

fn prealloc(count: u64) -> usize {
    usize::try_from(count.min(MAX_PREALLOC)).unwrap_or(0)
}

fn describe(ctx: Ctx<'_>) -> String {
    match ctx {
        Ctx::Header(what) => what.to_owned(),
        Ctx::Key(key) => format!("metadata key '{key}'"),
        Ctx::Tensor(tensor) => format!("tensor '{tensor}'"),
    }
}

/// `general.alignment`, or the default; any unsigned integer type is accepted (llama.cpp writes
/// u32) but the value must be a non-zero power of two that fits in u32.
fn alignment(file: &str, metadata: &BTreeMap<String, MetadataValue>) -> Result<u64> {
    const KEY: &str = "general.alignment";
    let Some(value) = metadata.get(KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let invalid = |reason: String| GgufError::InvalidMetadata {
        file: file.to_owned(),
        key: KEY.to_owned(),
        reason,
    };
    let align = value
        .as_integer()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| invalid(format!("expected a u32, found {}", value.describe())))?;
    if !align.is_power_of_two() {
        return Err(invalid(format!(
            "alignment must be a non-zero power of two, found {align}"
        )));
    }
    Ok(u64::from(align))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufFile;
    use crate::testutil::{GgufWriter, f32_bytes, header, put_str};
    use std::io::Cursor;

    fn parse(bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::read_header(Cursor::new(bytes), "bad.gguf")
    }

    fn parse_err(bytes: Vec<u8>) -> String {
        parse(bytes).unwrap_err().to_string()
    }

    /// A v3 file with no tensors whose metadata is the given raw entries.
    fn with_raw_kvs(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = header(3, 0, entries.len() as u64);
        for e in entries {
            buf.extend(e);
        }
        buf
    }

    fn raw_kv(key: &str, ty: u32, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        put_str(&mut buf, key);
        buf.extend(ty.to_le_bytes());
        buf.extend(payload);
        buf
    }

    fn array_header(elem_ty: u32, count: u64) -> Vec<u8> {
        let mut buf = elem_ty.to_le_bytes().to_vec();
        buf.extend(count.to_le_bytes());
        buf
    }

    /// A v3 file with one raw tensor-directory entry and `data_len` zero bytes of data.
    fn with_raw_tensor(name: &str, dims: &[u64], ty: u32, offset: u64, data_len: usize) -> Vec<u8> {
        let mut buf = header(3, 1, 0);
        put_str(&mut buf, name);
        buf.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            buf.extend(d.to_le_bytes());
        }
        buf.extend(ty.to_le_bytes());
        buf.extend(offset.to_le_bytes());
        buf.resize(buf.len().next_multiple_of(32) + data_len, 0);
        buf
    }

    fn valid_file() -> Vec<u8> {
        GgufWriter::new()
            .kv("general.name", MetadataValue::String("hello".into()))
            .kv(
                "tokenizer.ggml.tokens",
                MetadataValue::Array(vec![MetadataValue::String("a".into())]),
            )
            .tensor("blk.0.attn_q.weight", &[8], 0, f32_bytes(&[1.0; 8]))
            .build()
    }

    #[test]
    fn bad_magic() {
        let mut bytes = valid_file();
        bytes[..4].copy_from_slice(b"GGML");
        assert_eq!(
            parse_err(bytes),
            "bad.gguf: not a GGUF file: magic is \"GGML\", expected \"GGUF\""
        );
        assert_eq!(
            parse_err(vec![0x7f, b'E', b'L', b'F']),
            "bad.gguf: not a GGUF file: magic is \"\\x7fELF\", expected \"GGUF\""
        );
    }

    #[test]
    fn old_and_foreign_versions_are_refused() {
        assert_eq!(
            parse_err(header(1, 0, 0)),
            "bad.gguf: GGUF version 1 is not supported (only v2 and v3 are); v1 files (2023) \
             used 32-bit counts: re-convert the model with a current llama.cpp"
        );
        assert_eq!(
            parse_err(header(3u32.swap_bytes(), 0, 0)),
            "bad.gguf: GGUF version 50331648 is not supported (only v2 and v3 are); this looks \
             like a big-endian GGUF, which this reader does not support"
        );
        assert_eq!(
            parse_err(header(4, 0, 0)),
            "bad.gguf: GGUF version 4 is not supported (only v2 and v3 are)"
        );
    }

    #[test]
    fn truncated_header() {
        assert_eq!(
            parse_err(Vec::new()),
            "bad.gguf: magic: needs 4 bytes at byte 0 but the file has 0 bytes (truncated?)"
        );
        // 24-byte fixed header, then key (8 + 12), type (4), string length (8) -> "hello" at 56.
        let mut bytes = valid_file();
        bytes.truncate(58);
        assert_eq!(
            parse_err(bytes),
            "bad.gguf: metadata key 'general.name': needs 5 bytes at byte 56 but the file has \
             58 bytes (truncated?)"
        );
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        let full = valid_file();
        let data_end = {
            let f = parse(full.clone()).unwrap();
            f.tensor_data_range("blk.0.attn_q.weight").unwrap().end as usize
        };
        for cut in 0..full.len() {
            let result = parse(full[..cut].to_vec());
            assert_eq!(result.is_ok(), cut >= data_end, "cut at {cut}");
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let full = valid_file();
        for at in 0..full.len() {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff, full[at].wrapping_add(1)] {
                let mut bytes = full.clone();
                bytes[at] = v;
                let _ = parse(bytes);
            }
        }
    }

    #[test]
    fn truncated_tensor_data() {
        let mut bytes = valid_file();
        let len = bytes.len();
        bytes.truncate(len - 4);
        assert_eq!(
            parse_err(bytes),
            format!(
                "bad.gguf: tensor 'blk.0.attn_q.weight': data ends at byte {len} but the file \
                 has {} bytes (truncated?)",
                len - 4
            )
        );
    }

    #[test]
    fn string_lengths_beyond_the_file_or_the_cap() {
        let mut key = 1000u64.to_le_bytes().to_vec();
        key.extend(b"abcdefghijklm");
        assert_eq!(
            parse_err(with_raw_kvs(&[key])),
            "bad.gguf: metadata entry 0 (key): needs 1000 bytes at byte 32 but the file has 45 \
             bytes (truncated?)"
        );
        let value = raw_kv("k", 8, &500u64.to_le_bytes());
        assert_eq!(
            parse_err(with_raw_kvs(&[value])),
            "bad.gguf: metadata key 'k': needs 500 bytes at byte 45 but the file has 45 bytes \
             (truncated?)"
        );
        let huge = raw_kv("k", 8, &(1u64 << 40).to_le_bytes());
        assert_eq!(
            parse_err(with_raw_kvs(&[huge])),
            "bad.gguf: metadata key 'k': string length 1099511627776 exceeds the limit of \
             1048576 bytes"
        );
    }

    #[test]
    fn invalid_utf8_names_the_key() {
        let mut value = 2u64.to_le_bytes().to_vec();
        value.extend([b'a', 0xff]);
        assert_eq!(
            parse_err(with_raw_kvs(&[raw_kv("k", 8, &value)])),
            "bad.gguf: metadata key 'k': string is not valid UTF-8 (bad byte at index 1)"
        );
        let mut key = 1u64.to_le_bytes().to_vec();
        key.push(0xc3);
        key.extend(raw_kv("", 0, &[0]).split_off(8));
        assert_eq!(
            parse_err(with_raw_kvs(&[key])),
            "bad.gguf: metadata entry 0 (key): string is not valid UTF-8 (bad byte at index 0)"
        );
    }

    #[test]
    fn huge_array_counts_are_refused_before_allocating() {
        let huge = raw_kv("tokenizer.ggml.tokens", 9, &array_header(8, u64::MAX));
        assert_eq!(
            parse_err(with_raw_kvs(&[huge])),
            "bad.gguf: metadata key 'tokenizer.ggml.tokens': array of 18446744073709551615 string \
             exceeds the limit of 16777216 elements"
        );
        let beyond = raw_kv("k", 9, &array_header(4, 1000));
        assert_eq!(
            parse_err(with_raw_kvs(&[beyond])),
            "bad.gguf: metadata key 'k': needs 4000 bytes at byte 49 but the file has 49 bytes \
             (truncated?)"
        );
    }

    #[test]
    fn total_array_elements_are_capped() {
        // Each array is within the per-array cap, but together they are over the total; the
        // file really holds the bytes, so the byte checks alone would pass.
        let first = MAX_TOTAL_ARRAY_ELEMENTS - 2;
        let mut big = array_header(0, first);
        big.resize(big.len() + first as usize, 0);
        let mut small = array_header(0, 3);
        small.extend([0; 3]);
        let entries = [raw_kv("a", 9, &big), raw_kv("b", 9, &small)];
        assert_eq!(
            parse_err(with_raw_kvs(&entries)),
            "bad.gguf: metadata key 'b': metadata arrays hold more than 16777216 elements in all"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let mut payload = array_header(9, 1);
        payload.extend(array_header(0, 1));
        payload.push(7);
        assert!(parse(with_raw_kvs(&[raw_kv("ok", 9, &payload)])).is_ok());
        let mut payload = array_header(9, 1);
        payload.extend(array_header(9, 1));
        payload.extend(array_header(0, 1));
        payload.push(7);
        assert_eq!(
            parse_err(with_raw_kvs(&[raw_kv("deep", 9, &payload)])),
            "bad.gguf: metadata key 'deep': arrays are nested more than 2 deep"
        );
    }

    #[test]
    fn unknown_value_types_and_bad_bools() {
        assert_eq!(
            parse_err(with_raw_kvs(&[raw_kv("k", 13, &[0; 8])])),
            "bad.gguf: metadata key 'k': unknown value type 13"
        );
        assert_eq!(
            parse_err(with_raw_kvs(&[raw_kv("k", 9, &array_header(42, 1))])),
            "bad.gguf: metadata key 'k': unknown array element type 42"
        );
        assert_eq!(
            parse_err(with_raw_kvs(&[raw_kv("k", 7, &[2])])),
            "bad.gguf: metadata key 'k': bool byte is 2, expected 0 or 1"
        );
    }

    #[test]
    fn duplicate_keys_and_tensors() {
        let kv = raw_kv("general.name", 4, &7u32.to_le_bytes());
        assert_eq!(
            parse_err(with_raw_kvs(&[kv.clone(), kv])),
            "bad.gguf: metadata key 'general.name' appears twice"
        );
        let bytes = GgufWriter::new()
            .tensor("t", &[1], 0, f32_bytes(&[1.0]))
            .tensor("t", &[1], 0, f32_bytes(&[2.0]))
            .build();
        assert_eq!(
            parse_err(bytes),
            "bad.gguf: tensor 't' appears twice in the tensor directory"
        );
    }

    #[test]
    fn counts_beyond_the_file_are_refused() {
        assert_eq!(
            parse_err(header(3, 1 << 40, 0)),
            "bad.gguf: tensor count is 1099511627776, but the 8 bytes after it hold at most 0"
        );
        assert_eq!(
            parse_err(header(3, 0, u64::MAX)),
            "bad.gguf: metadata entry count is 18446744073709551615, but the 0 bytes after it \
             hold at most 0"
        );
    }

    #[test]
    fn alignment_must_be_a_power_of_two() {
        for (align, found) in [(48u32, "48"), (0, "0")] {
            let bytes = with_raw_kvs(&[raw_kv("general.alignment", 4, &align.to_le_bytes())]);
            assert_eq!(
                parse_err(bytes),
                format!(
                    "bad.gguf: metadata key 'general.alignment': alignment must be a non-zero \
                     power of two, found {found}"
                )
            );
        }
        let bytes = with_raw_kvs(&[raw_kv("general.alignment", 6, &1.0f32.to_le_bytes())]);
        assert_eq!(
            parse_err(bytes),
            "bad.gguf: metadata key 'general.alignment': expected a u32, found f32 1"
        );
    }

    #[test]
    fn misaligned_tensor_offset() {
        let mut w = GgufWriter::new()
            .tensor("a", &[8], 0, f32_bytes(&[0.0; 8]))
            .tensor("b", &[8], 0, f32_bytes(&[0.0; 8]));
        w.tensors[1].offset_skew = 4;
        assert_eq!(
            parse_err(w.build()),
            "bad.gguf: tensor 'b': offset 36 is not a multiple of the alignment 32"
        );
    }

    #[test]
    fn impossible_dimensions() {
        assert_eq!(
            parse_err(with_raw_tensor("t", &[1 << 32, 1 << 32, 1 << 32], 0, 0, 0)),
            "bad.gguf: tensor 't': element count of dims [4294967296, 4294967296, 4294967296] \
             overflows"
        );
        assert_eq!(
            parse_err(with_raw_tensor("t", &[4, 0], 0, 0, 0)),
            "bad.gguf: tensor 't': dimension 1 is 0 (dims [4, 0])"
        );
        assert_eq!(
            parse_err(with_raw_tensor("t", &[1; 5], 0, 0, 4)),
            "bad.gguf: tensor 't': has 5 dimensions; ggml allows at most 4"
        );
        assert_eq!(
            parse_err(with_raw_tensor("t", &[16, 2], 2, 0, 36)),
            "bad.gguf: tensor 't': first dimension 16 is not a multiple of the Q4_0 block size 32"
        );
        assert_eq!(
            parse_err(with_raw_tensor("t", &[4], 99, 0, 64)),
            "bad.gguf: tensor 't': has unknown ggml type 99, so its size is unknown"
        );
        assert_eq!(
            parse_err(with_raw_tensor("t", &[4], 0, u64::MAX - 31, 16)),
            "bad.gguf: tensor 't': offset 18446744073709551584 + 16 bytes overflows"
        );
        // A scalar (no dims) has one element.
        let file = parse(with_raw_tensor("s", &[], 0, 0, 4)).unwrap();
        assert_eq!(file.tensors[0].n_elements(), 1);
        assert!(file.tensors[0].shape().is_empty());
    }
}
