//! [`GgufFile`]: a parsed header plus what is needed to find tensor data later, and
//! [`TensorInfo`], one entry of the tensor directory.
//!
//! Opening parses only the header and checks every tensor's extent, so a truncated download
//! fails at open naming the first tensor that does not fit, not halfway through loading. Tensor
//! data is read on demand with plain reads (no mmap: this workspace forbids unsafe code).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::dequant::dequantize;
use crate::error::{GgufError, Result};
use crate::metadata::MetadataValue;
use crate::parse::{Header, Parser};
use crate::types::GgmlType;

/// One tensor-directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// As stored: `dims[0]` is the fastest-varying dimension (ggml `ne[0]`), i.e. the reverse of
    /// a PyTorch shape. A 2-D weight `[out, in]` in PyTorch is stored as `dims = [in, out]`.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Row-major (PyTorch) shape: `dims` reversed. Dimensions beyond `usize` (only possible on
    /// 32-bit targets) saturate.
    pub fn shape(&self) -> Vec<usize> {
        self.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }

    /// Product of the dimensions (1 for a scalar), saturating; tensors of a parsed
    /// [`GgufFile`] were checked not to overflow.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// Bytes the data occupies. Fails for an unknown type, rows that are not whole blocks, or
    /// overflow; never for a tensor of a parsed [`GgufFile`], which were all checked at open.
    /// The error names the file as `(tensor info)` because a bare `TensorInfo` does not know it.
    pub fn n_bytes(&self) -> Result<u64> {
        self.checked_n_bytes("(tensor info)")
    }

    /// [`TensorInfo::n_bytes`] with errors naming `file`; also the open-time validation.
    pub(crate) fn checked_n_bytes(&self, file: &str) -> Result<u64> {
        let invalid = |reason: String| GgufError::InvalidTensor {
            file: file.to_owned(),
            tensor: self.name.clone(),
            reason,
        };
        if let Some(k) = self.dims.iter().position(|&d| d == 0) {
            return Err(invalid(format!(
                "dimension {k} is 0 (dims {:?})",
                self.dims
            )));
        }
        let n_elements = self
            .dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| invalid(format!("element count of dims {:?} overflows", self.dims)))?;
        let (Some(block), Some(size)) = (self.dtype.block_size(), self.dtype.type_size()) else {
            return Err(invalid(format!(
                "has {}, so its size is unknown",
                self.dtype
            )));
        };
        let (block, size) = (block as u64, size as u64);
        let row = self.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(invalid(format!(
                "first dimension {row} is not a multiple of the {} block size {block}",
                self.dtype
            )));
        }
        (n_elements / block)
            .checked_mul(size)
            .ok_or_else(|| invalid(format!("byte size of dims {:?} overflows", self.dims)))
    }
}

/// A parsed GGUF header: version, metadata and tensor directory, plus where the data lives.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, MetadataValue>,
    pub tensors: Vec<TensorInfo>,
    /// Names the file in every error: the path as given, or the label passed to `read_header`.
    source: String,
    path: Option<PathBuf>,
    data_offset: u64,
    alignment: u64,
    file_len: u64,
}

impl GgufFile {
    /// Parses the header of the file at `path` and checks every tensor's extent against the
    /// file length. Tensor data is not read.
    pub fn open(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let io = |context: &str, error| GgufError::Io {
            file: source.clone(),
            context: context.to_owned(),
            error,
        };
        let file = File::open(path).map_err(|e| io("opening", e))?;
        let len = file
            .metadata()
            .map_err(|e| io("reading file size", e))?
            .len();
        let header = Parser::new(BufReader::new(file), &source, len).parse()?;
        let mut gguf = Self::from_header(header, source, len)?;
        gguf.path = Some(path.to_owned());
        Ok(gguf)
    }

    /// As [`GgufFile::open`], from any seekable stream, which is read from its start; `source`
    /// names it in errors. The result has no path, so read tensors with
    /// [`GgufFile::tensor_f32_from`].
    pub fn read_header<R: Read + Seek>(mut reader: R, source: &str) -> Result<Self> {
        let io = |context: &str, error| GgufError::Io {
            file: source.to_owned(),
            context: context.to_owned(),
            error,
        };
        let len = reader
            .seek(SeekFrom::End(0))
            .map_err(|e| io("seeking to the end", e))?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| io("seeking to the start", e))?;
        let header = Parser::new(BufReader::new(reader), source, len).parse()?;
        Self::from_header(header, source.to_owned(), len)
    }

    fn from_header(header: Header, source: String, file_len: u64) -> Result<Self> {
        let gguf = GgufFile {
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            source,
            path: None,
            data_offset: header.data_offset,
            alignment: header.alignment,
            file_len,
        };
        for info in &gguf.tensors {
            gguf.data_range(info)?;
        }
        Ok(gguf)
    }

    /// The path, or the label given to [`GgufFile::read_header`].
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Absolute byte offset of the data section (header end rounded up to the alignment).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Absolute byte range of a tensor's data in the file.
    pub fn tensor_data_range(&self, name: &str) -> Result<Range<u64>> {
        self.data_range(self.find(name)?)
    }

    /// The raw (still quantised) bytes of a tensor, read from the file at [`GgufFile::path`].
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        self.tensor_bytes_from(&mut self.reopen()?, name)
    }

    /// The raw bytes of a tensor from `reader`, which must hold the same file.
    pub fn tensor_bytes_from<R: Read + Seek>(&self, reader: &mut R, name: &str) -> Result<Vec<u8>> {
        let info = self.find(name)?;
        let range = self.data_range(info)?;
        let io = |error| GgufError::Io {
            file: self.source.clone(),
            context: format!(
                "reading tensor '{name}' (bytes {}..{})",
                range.start, range.end
            ),
            error,
        };
        // The range was checked against the file length, which bounds this allocation.
        let len = usize::try_from(range.end - range.start).map_err(|_| {
            self.invalid_tensor(name, "is too large to load on this platform".to_owned())
        })?;
        let mut buf = vec![0u8; len];
        reader.seek(SeekFrom::Start(range.start)).map_err(io)?;
        reader.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    /// A tensor dequantised to f32, in storage order (`dims[0]` fastest), which is row-major
    /// order for [`TensorInfo::shape`]. Reads from the file at [`GgufFile::path`].
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.tensor_f32_from(&mut self.reopen()?, name)
    }

    /// As [`GgufFile::tensor_f32`], reading from `reader`, which must hold the same file.
    pub fn tensor_f32_from<R: Read + Seek>(&self, reader: &mut R, name: &str) -> Result<Vec<f32>> {
        let info = self.find(name)?;
        // Refuse before reading possibly hundreds of megabytes we cannot convert.
        if !info.dtype.can_dequantize() {
            return Err(self.dequant_error(name, crate::DequantError::Unsupported(info.dtype)));
        }
        let n = usize::try_from(info.n_elements()).map_err(|_| {
            self.invalid_tensor(name, "is too large to load on this platform".to_owned())
        })?;
        let bytes = self.tensor_bytes_from(reader, name)?;
        dequantize(info.dtype, &bytes, n).map_err(|e| self.dequant_error(name, e))
    }

    fn reopen(&self) -> Result<File> {
        let path = self.path.as_deref().ok_or_else(|| GgufError::NoPath {
            file: self.source.clone(),
        })?;
        File::open(path).map_err(|error| GgufError::Io {
            file: self.source.clone(),
            context: "reopening to read tensor data".to_owned(),
            error,
        })
    }

    fn find(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| GgufError::TensorNotFound {
            file: self.source.clone(),
            tensor: name.to_owned(),
        })
    }

    /// Checks a tensor against the layout and returns its absolute byte range: size computable,
    /// offset aligned, data inside the file. Used at open for every tensor and again before each
    /// read, since `tensors` is public and may have been edited.
    fn data_range(&self, info: &TensorInfo) -> Result<Range<u64>> {
        let n_bytes = info.checked_n_bytes(&self.source)?;
        if !info.offset.is_multiple_of(self.alignment) {
            return Err(self.invalid_tensor(
                &info.name,
                format!(
                    "offset {} is not a multiple of the alignment {}",
                    info.offset, self.alignment
                ),
            ));
        }
        let overflow = || {
            self.invalid_tensor(
                &info.name,
                format!("offset {} + {n_bytes} bytes overflows", info.offset),
            )
        };
        let start = self
            .data_offset
            .checked_add(info.offset)
            .ok_or_else(overflow)?;
        let end = start.checked_add(n_bytes).ok_or_else(overflow)?;
        if end > self.file_len {
            return Err(GgufError::TensorOutOfBounds {
                file: self.source.clone(),
                tensor: info.name.clone(),
                end,
                len: self.file_len,
            });
        }
        Ok(start..end)
    }

    fn invalid_tensor(&self, name: &str, reason: String) -> GgufError {
        GgufError::InvalidTensor {
            file: self.source.clone(),
            tensor: name.to_owned(),
            reason,
        }
    }

    fn dequant_error(&self, name: &str, error: crate::DequantError) -> GgufError {
        GgufError::Dequantize {
            file: self.source.clone(),
            tensor: name.to_owned(),
            error,
        }
    }

    // ---- metadata -------------------------------------------------------------------------

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.get(key)
    }

    pub fn has(&self, key: &str) -> bool {
        self.metadata.contains_key(key)
    }

    /// `general.architecture` (`"llama"`, `"qwen2"`, ...), the prefix of the model's own keys.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// Any integer type whose value fits in u32 (llama.cpp writes most counts as u32, but some
    /// converters write u64 or i32).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.typed(key, "an integer in the u32 range", |v| {
            v.as_integer().and_then(|i| u32::try_from(i).ok())
        })
    }

    /// Any integer type whose value fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.typed(key, "an integer in the u64 range", |v| {
            v.as_integer().and_then(|i| u64::try_from(i).ok())
        })
    }

    /// Any integer type whose value fits in i64.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.typed(key, "an integer in the i64 range", |v| {
            v.as_integer().and_then(|i| i64::try_from(i).ok())
        })
    }

    /// F32, or F64 rounded to f32.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.typed(key, "f32 or f64", MetadataValue::as_f32)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.typed(key, "string", MetadataValue::as_str)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.typed(key, "bool", MetadataValue::as_bool)
    }

    /// An array of strings (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.typed_array(key, "array of string", MetadataValue::as_str)
    }

    /// An array of integers that fit in i32 (`tokenizer.ggml.token_type` is i32).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.typed_array(key, "array of integers in the i32 range", |v| {
            v.as_integer().and_then(|i| i32::try_from(i).ok())
        })
    }

    /// An array of integers that fit in u32 (per-layer head counts in some architectures).
    pub fn get_u32_array(&self, key: &str) -> Result<Vec<u32>> {
        self.typed_array(key, "array of integers in the u32 range", |v| {
            v.as_integer().and_then(|i| u32::try_from(i).ok())
        })
    }

    /// An array of f32/f64 (`tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.typed_array(key, "array of f32 or f64", MetadataValue::as_f32)
    }

    /// `Ok(None)` when the key is absent; an error when present with the wrong type.
    pub fn get_opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.optional(key, Self::get_u32)
    }

    pub fn get_opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.optional(key, Self::get_f32)
    }

    pub fn get_opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.optional(key, Self::get_str)
    }

    pub fn get_opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.optional(key, Self::get_bool)
    }

    fn optional<'a, T>(
        &'a self,
        key: &str,
        get: impl Fn(&'a Self, &str) -> Result<T>,
    ) -> Result<Option<T>> {
        if self.has(key) {
            get(self, key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn require(&self, key: &str) -> Result<&MetadataValue> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            file: self.source.clone(),
            key: key.to_owned(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: String) -> GgufError {
        GgufError::WrongType {
            file: self.source.clone(),
            key: key.to_owned(),
            expected,
            found,
        }
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl Fn(&'a MetadataValue) -> Option<T>,
    ) -> Result<T> {
        let value = self.require(key)?;
        convert(value).ok_or_else(|| self.wrong_type(key, expected, value.describe()))
    }

    fn typed_array<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl Fn(&'a MetadataValue) -> Option<T>,
    ) -> Result<Vec<T>> {
        let value = self.require(key)?;
        let items = value
            .as_array()
            .ok_or_else(|| self.wrong_type(key, expected, value.describe()))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                convert(item).ok_or_else(|| {
                    let found = format!(
                        "{} whose element {i} is {}",
                        value.describe(),
                        item.describe()
                    );
                    self.wrong_type(key, expected, found)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{GgufWriter, f16_bytes, f32_bytes};
    use std::io::Cursor;

    fn read(bytes: Vec<u8>) -> GgufFile {
        GgufFile::read_header(Cursor::new(bytes), "test.gguf").unwrap()
    }

    fn f32_of(file: &GgufFile, bytes: &[u8], name: &str) -> Vec<f32> {
        file.tensor_f32_from(&mut Cursor::new(bytes), name).unwrap()
    }

    fn every_metadata_type() -> Vec<(&'static str, MetadataValue)> {
        use MetadataValue as V;
        vec![
            ("general.architecture", V::String("llama".into())),
            ("t.u8", V::U8(200)),
            ("t.i8", V::I8(-100)),
            ("t.u16", V::U16(60000)),
            ("t.i16", V::I16(-30000)),
            ("t.u32", V::U32(4_000_000_000)),
            ("t.i32", V::I32(-2_000_000_000)),
            ("t.u64", V::U64(u64::MAX)),
            ("t.i64", V::I64(i64::MIN)),
            ("t.f32", V::F32(1e-5)),
            ("t.f64", V::F64(100000.0)),
            ("t.bool", V::Bool(true)),
            ("t.empty", V::String(String::new())),
            ("t.unicode", V::String("héllo ▁world".into())),
            (
                "t.tokens",
                V::Array(vec![V::String("<s>".into()), V::String("▁a".into())]),
            ),
            ("t.types", V::Array(vec![V::I32(1), V::I32(3), V::I32(-1)])),
            ("t.scores", V::Array(vec![V::F32(-1.5), V::F32(0.0)])),
            (
                "t.nested",
                V::Array(vec![V::Array(vec![V::U8(1)]), V::Array(vec![V::U8(2)])]),
            ),
        ]
    }

    /// One 32-value Q8_0 block with d = 0.25 and q = i - 16.
    fn q8_0_block() -> (Vec<u8>, Vec<f32>) {
        let mut b = f16_bytes(0.25).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        (b, (0..32).map(|i| (i - 16) as f32 * 0.25).collect())
    }

    /// One Q4_0 block with d = 1.5 and every nibble 9 (element value 1.5).
    fn q4_0_block() -> (Vec<u8>, Vec<f32>) {
        let mut b = f16_bytes(1.5).to_vec();
        b.extend([0x99u8; 16]);
        (b, vec![1.5; 32])
    }

    /// Two Q4_1 blocks: d = 0.5, m = -1, byte j = j | (15-j) << 4, then d = 2, m = 3, zeros.
    fn q4_1_blocks() -> (Vec<u8>, Vec<f32>) {
        let mut b = f16_bytes(0.5).to_vec();
        b.extend(f16_bytes(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        b.extend(f16_bytes(2.0));
        b.extend(f16_bytes(3.0));
        b.extend([0u8; 16]);
        let mut want: Vec<f32> = (0..16).map(|j| 0.5 * j as f32 - 1.0).collect();
        want.extend((0..16).map(|j| 0.5 * (15 - j) as f32 - 1.0));
        want.extend([3.0; 32]);
        (b, want)
    }

    fn sample_file() -> (Vec<u8>, Vec<(&'static str, Vec<f32>)>) {
        let mut w = GgufWriter::new();
        for (k, v) in every_metadata_type() {
            w = w.kv(k, v);
        }
        let f32s = [1.0, -2.0, 3.5, 0.0, 1e-3, -7.25];
        let f16s = [0.5f32, -1.0, 65504.0, 0.099975586];
        let bf16s = [1.5f32, -2.5, 256.0];
        let (q8, q8_want) = q8_0_block();
        let (q40, q40_want) = q4_0_block();
        let (q41, q41_want) = q4_1_blocks();
        let w = w
            .tensor("f32", &[3, 2], 0, f32_bytes(&f32s))
            .tensor(
                "f16",
                &[4],
                1,
                f16s.iter().flat_map(|&v| f16_bytes(v)).collect(),
            )
            .tensor(
                "bf16",
                &[3],
                30,
                bf16s
                    .iter()
                    .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
            )
            .tensor("q8_0", &[32], 8, q8)
            .tensor("q4_0", &[32, 1], 2, q40)
            .tensor("q4_1", &[32, 2], 3, q41);
        let want = vec![
            ("f32", f32s.to_vec()),
            ("f16", f16s.to_vec()),
            ("bf16", bf16s.to_vec()),
            ("q8_0", q8_want),
            ("q4_0", q40_want),
            ("q4_1", q41_want),
        ];
        (w.build(), want)
    }

    #[test]
    fn round_trips_metadata_of_every_type_and_tensors() {
        let (bytes, want) = sample_file();
        let file = read(bytes.clone());
        assert_eq!(file.version, 3);
        let expected: BTreeMap<String, MetadataValue> = every_metadata_type()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(file.metadata, expected);
        assert_eq!(file.tensors.len(), 6);
        assert_eq!(file.alignment(), 32);
        assert_eq!(file.data_offset() % 32, 0);
        for (name, values) in &want {
            assert_eq!(&f32_of(&file, &bytes, name), values, "tensor {name}");
        }
        let t = file.tensor("f32").unwrap();
        assert_eq!((t.dims.clone(), t.shape()), (vec![3, 2], vec![2, 3]));
        assert_eq!((t.n_elements(), t.n_bytes().unwrap()), (6, 24));
        let q = file.tensor("q4_1").unwrap();
        assert_eq!(
            (q.dtype, q.shape(), q.n_bytes().unwrap()),
            (GgmlType::Q4_1, vec![2, 32], 40)
        );
        assert!(file.tensors.iter().all(|t| t.offset % 32 == 0));
        assert_eq!(file.tensor("q4_1").map(|t| t.name.as_str()), Some("q4_1"));
        assert!(file.tensor("nope").is_none());
    }

    #[test]
    fn reads_v2_files_and_custom_alignment() {
        let mut w = GgufWriter::new().alignment(64);
        w.version = 2;
        let w = w.tensor("a", &[3], 0, f32_bytes(&[1.0, 2.0, 3.0])).tensor(
            "b",
            &[2],
            0,
            f32_bytes(&[4.0, 5.0]),
        );
        let bytes = w.build();
        let file = read(bytes.clone());
        assert_eq!((file.version, file.alignment()), (2, 64));
        assert_eq!(file.data_offset() % 64, 0);
        assert_eq!(file.tensor("b").unwrap().offset, 64);
        assert_eq!(f32_of(&file, &bytes, "b"), [4.0, 5.0]);
        assert_eq!(
            file.tensor_data_range("b").unwrap(),
            file.data_offset() + 64..file.data_offset() + 72
        );
    }

    #[test]
    fn open_reads_tensors_from_the_path_and_errors_name_it() {
        let (bytes, want) = sample_file();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.path(), Some(path.as_path()));
        assert_eq!(file.file_len(), bytes.len() as u64);
        for (name, values) in &want {
            assert_eq!(&file.tensor_f32(name).unwrap(), values);
        }
        assert_eq!(file.tensor_bytes("q8_0").unwrap().len(), 34);
        let shown = path.display();
        assert_eq!(
            file.tensor_f32("missing").unwrap_err().to_string(),
            format!("{shown}: no tensor named 'missing'")
        );
        let absent = dir.path().join("absent.gguf");
        let err = GgufFile::open(&absent).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: opening: ", absent.display())),
            "{err}"
        );
    }

    #[test]
    fn stream_headers_need_a_reader_for_tensor_data() {
        let (bytes, _) = sample_file();
        let file = read(bytes);
        assert_eq!(
            file.tensor_f32("f32").unwrap_err().to_string(),
            "test.gguf: the header was read from a stream, so tensor data must be read with \
             tensor_f32_from"
        );
    }

    #[test]
    fn unsupported_tensor_type_is_refused_by_name() {
        let bytes = GgufWriter::new()
            .tensor("blk.0.ffn_up.weight", &[256], 16, vec![0; 66])
            .build();
        let file = read(bytes.clone());
        assert_eq!(
            file.tensor("blk.0.ffn_up.weight").unwrap().dtype,
            GgmlType::IQ2XXS
        );
        let err = file
            .tensor_f32_from(&mut Cursor::new(&bytes), "blk.0.ffn_up.weight")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "test.gguf: tensor 'blk.0.ffn_up.weight': dequantisation of type IQ2_XXS is not \
             supported"
        );
        // The raw bytes are still available for a caller that handles the type itself.
        let raw = file.tensor_bytes_from(&mut Cursor::new(&bytes), "blk.0.ffn_up.weight");
        assert_eq!(raw.unwrap().len(), 66);
    }

    #[test]
    fn typed_getters_convert_leniently_and_name_key_and_types_on_error() {
        let (bytes, _) = sample_file();
        let f = read(bytes);
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.get_u32("t.u8").unwrap(), 200);
        assert_eq!(f.get_u32("t.u32").unwrap(), 4_000_000_000);
        assert_eq!(f.get_u64("t.u64").unwrap(), u64::MAX);
        assert_eq!(f.get_i64("t.i64").unwrap(), i64::MIN);
        assert_eq!(f.get_f32("t.f32").unwrap(), 1e-5);
        assert_eq!(f.get_f32("t.f64").unwrap(), 100000.0);
        assert!(f.get_bool("t.bool").unwrap());
        assert_eq!(f.get_str("t.unicode").unwrap(), "héllo ▁world");
        assert_eq!(f.get_str_array("t.tokens").unwrap(), ["<s>", "▁a"]);
        assert_eq!(f.get_i32_array("t.types").unwrap(), [1, 3, -1]);
        assert_eq!(f.get_f32_array("t.scores").unwrap(), [-1.5, 0.0]);
        assert_eq!(f.get_opt_u32("absent").unwrap(), None);
        assert_eq!(
            f.get_opt_str("general.architecture").unwrap(),
            Some("llama")
        );
        assert_eq!(f.get_opt_f32("t.f32").unwrap(), Some(1e-5));
        assert_eq!(f.get_opt_bool("t.bool").unwrap(), Some(true));
        assert!(f.has("t.i8") && !f.has("absent"));

        assert_eq!(
            err(f.get_u32("t.i8")),
            "test.gguf: metadata key 't.i8': expected an integer in the u32 range, found i8 -100"
        );
        assert_eq!(
            err(f.get_u32("t.u64")),
            "test.gguf: metadata key 't.u64': expected an integer in the u32 range, found u64 \
             18446744073709551615"
        );
        assert_eq!(
            err(f.get_f32("t.u32")),
            "test.gguf: metadata key 't.u32': expected f32 or f64, found u32 4000000000"
        );
        assert_eq!(
            err(f.get_str("t.bool")),
            "test.gguf: metadata key 't.bool': expected string, found bool true"
        );
        assert_eq!(
            err(f.get_str_array("t.types")),
            "test.gguf: metadata key 't.types': expected array of string, found array of 3 i32 \
             whose element 0 is i32 1"
        );
        assert_eq!(
            err(f.get_i32_array("t.unicode")),
            "test.gguf: metadata key 't.unicode': expected array of integers in the i32 range, \
             found string of 15 bytes"
        );
        assert_eq!(
            err(f.get_bool("absent")),
            "test.gguf: metadata key 'absent' is missing"
        );
        assert_eq!(
            err(f.get_opt_u32("t.f32")),
            "test.gguf: metadata key 't.f32': expected an integer in the u32 range, found f32 \
             0.00001"
        );
    }

    /// Cross-checks against llama.cpp's own output when the SmolLM2 Q4_1 model is in the cache.
    /// Reference numbers from gguf-py 0.19.0 (`GGUFReader` + `gguf.quants.dequantize`, summed in
    /// f64).
    #[test]
    fn smollm2_q4_1_matches_gguf_py_when_present() {
        let cache = std::env::var_os("RSLLM_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rsllm")));
        let Some(path) = cache.map(|c| c.join("models/llm/SmolLM2-135M-Instruct.Q4_1.gguf")) else {
            eprintln!("skipping: neither RSLLM_CACHE_DIR nor HOME is set");
            return;
        };
        if !path.exists() {
            eprintln!("skipping: {} not present", path.display());
            return;
        }
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.version, 3);
        assert_eq!(file.architecture().unwrap(), "llama");
        assert_eq!(file.get_u32("llama.block_count").unwrap(), 30);
        assert_eq!(file.get_u32("llama.embedding_length").unwrap(), 576);
        assert_eq!(file.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
        assert_eq!(
            file.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
            49152
        );
        assert_eq!(
            file.get_i32_array("tokenizer.ggml.token_type")
                .unwrap()
                .len(),
            49152
        );
        assert_eq!(
            file.get_str_array("tokenizer.ggml.merges").unwrap().len(),
            48900
        );
        assert!(!file.get_bool("tokenizer.ggml.add_bos_token").unwrap());
        assert_eq!(file.tensors.len(), 272);

        let embd = file.tensor("token_embd.weight").unwrap();
        assert_eq!(
            (embd.shape(), embd.dtype),
            (vec![49152, 576], GgmlType::Q8_0)
        );
        assert_eq!(embd.dims, [576, 49152]);
        let embd = file.tensor_f32("token_embd.weight").unwrap();
        assert_eq!(embd.len(), 49152 * 576);
        assert_close(
            &embd[..8],
            &[
                -0.10654449462890625,
                0.032978057861328125,
                0.048198699951171875,
                -0.022830963134765625,
                -0.06849288940429688,
                -0.04566192626953125,
                0.020294189453125,
                -0.12176513671875,
            ],
        );
        assert_rel(
            sum(&embd[..576]),
            -2.2541093826293945,
            "token_embd row 0 sum",
        );
        assert_rel(sum(&embd), -15353.04449415207, "token_embd sum");

        let q = file.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!((q.shape(), q.dtype), (vec![576, 576], GgmlType::Q4_1));
        let q = file.tensor_f32("blk.0.attn_q.weight").unwrap();
        assert!(q.iter().all(|v| v.is_finite()));
        assert_close(
            &q[..8],
            &[
                -0.0963134765625,
                0.1573486328125,
                -0.0963134765625,
                -0.73046875,
                1.1719970703125,
                -0.0963134765625,
                0.030517578125,
                0.6646728515625,
            ],
        );
        assert_rel(sum(&q), 59.22322082519531, "attn_q sum");
        assert_rel(sum(&q[..576]), 1.00726318359375, "attn_q row 0 sum");
        let mean = sum(&q) / q.len() as f64;
        let var = q
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / q.len() as f64;
        assert_rel(var.sqrt(), 0.28394606853848364, "attn_q std");

        let norm = file.tensor_f32("output_norm.weight").unwrap();
        assert_rel(sum(&norm), 1038.33203125, "output_norm sum");
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    fn sum(v: &[f32]) -> f64 {
        v.iter().map(|&x| f64::from(x)).sum()
    }

    fn assert_rel(got: f64, want: f64, what: &str) {
        assert!(
            (got - want).abs() <= 1e-6 * want.abs(),
            "{what}: got {got}, want {want}"
        );
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert_rel(f64::from(g), w, &format!("element {i}"));
        }
    }
}
