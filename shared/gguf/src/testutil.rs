//! A minimal GGUF writer for tests: builds files as byte buffers, so tests need no fixtures.
//! It writes what llama.cpp's `gguf_write_to_buf` writes (header, metadata, tensor directory,
//! padding to the alignment, tensor data each padded to the alignment).

use crate::MAGIC;
use crate::metadata::{MetadataValue, type_id};

pub struct TestTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
    /// Added to the offset the writer computes, to misalign a tensor on purpose.
    pub offset_skew: u64,
}

pub struct GgufWriter {
    pub version: u32,
    pub alignment: u64,
    pub kvs: Vec<(String, MetadataValue)>,
    pub tensors: Vec<TestTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            alignment: 32,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub fn kv(mut self, key: &str, value: MetadataValue) -> Self {
        self.kvs.push((key.to_owned(), value));
        self
    }

    /// Writes `general.alignment` and pads with it.
    pub fn alignment(mut self, alignment: u32) -> Self {
        self.alignment = u64::from(alignment);
        self.kv("general.alignment", MetadataValue::U32(alignment))
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors.push(TestTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            type_id,
            data,
            offset_skew: 0,
        });
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut buf = header(
            self.version,
            self.tensors.len() as u64,
            self.kvs.len() as u64,
        );
        for (key, value) in &self.kvs {
            put_str(&mut buf, key);
            put_typed(&mut buf, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut buf, &t.name);
            buf.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                buf.extend(d.to_le_bytes());
            }
            buf.extend(t.type_id.to_le_bytes());
            buf.extend((offset + t.offset_skew).to_le_bytes());
            offsets.push(offset + t.offset_skew);
            offset = (offset + t.data.len() as u64).next_multiple_of(self.alignment);
        }
        pad(&mut buf, self.alignment);
        let data_start = buf.len() as u64;
        for (t, off) in self.tensors.iter().zip(offsets) {
            buf.resize((data_start + off) as usize, 0);
            buf.extend(&t.data);
        }
        pad(&mut buf, self.alignment);
        buf
    }
}

pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut buf = MAGIC.to_vec();
    buf.extend(version.to_le_bytes());
    buf.extend(n_tensors.to_le_bytes());
    buf.extend(n_kv.to_le_bytes());
    buf
}

fn pad(buf: &mut Vec<u8>, alignment: u64) {
    let len = (buf.len() as u64).next_multiple_of(alignment);
    buf.resize(len as usize, 0);
}

pub fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

/// Type id then payload.
pub fn put_typed(buf: &mut Vec<u8>, v: &MetadataValue) {
    buf.extend(v.type_id().to_le_bytes());
    put_payload(buf, v);
}

fn put_payload(buf: &mut Vec<u8>, v: &MetadataValue) {
    match v {
        MetadataValue::U8(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::I8(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::U16(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::I16(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::U32(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::I32(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::U64(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::I64(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::F32(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::F64(x) => buf.extend(x.to_le_bytes()),
        MetadataValue::Bool(x) => buf.push(u8::from(*x)),
        MetadataValue::String(s) => put_str(buf, s),
        MetadataValue::Array(items) => {
            let elem = items
                .first()
                .map_or(type_id::STRING, MetadataValue::type_id);
            buf.extend(elem.to_le_bytes());
            buf.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_payload(buf, item);
            }
        }
    }
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}
