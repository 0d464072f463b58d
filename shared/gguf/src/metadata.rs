//! GGUF metadata values.
//!
//! The value types mirror `gguf_type` in llama.cpp's `gguf.h` one for one, so what a file holds
//! is visible without loss (a u8 stays a u8); the typed getters on [`crate::GgufFile`] do the
//! lenient conversions callers usually want.

#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    /// GGUF arrays are homogeneous; an array read from a file never mixes element types.
    Array(Vec<MetadataValue>),
}

/// On-disk value type ids (`enum gguf_type`).
pub(crate) mod type_id {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The fewest bytes one value of an on-disk type can occupy (a string's length prefix, an array's
/// element type and count), so an array's count can be checked against the bytes left in the file
/// before anything is allocated. `None` for an unknown type id.
pub(crate) fn min_encoded_size(id: u32) -> Option<u64> {
    match id {
        type_id::U8 | type_id::I8 | type_id::BOOL => Some(1),
        type_id::U16 | type_id::I16 => Some(2),
        type_id::U32 | type_id::I32 | type_id::F32 => Some(4),
        type_id::U64 | type_id::I64 | type_id::F64 | type_id::STRING => Some(8),
        type_id::ARRAY => Some(12),
        _ => None,
    }
}

/// The name of an on-disk type id, for error messages.
pub(crate) fn type_id_name(id: u32) -> &'static str {
    match id {
        type_id::U8 => "u8",
        type_id::I8 => "i8",
        type_id::U16 => "u16",
        type_id::I16 => "i16",
        type_id::U32 => "u32",
        type_id::I32 => "i32",
        type_id::F32 => "f32",
        type_id::BOOL => "bool",
        type_id::STRING => "string",
        type_id::ARRAY => "array",
        type_id::U64 => "u64",
        type_id::I64 => "i64",
        type_id::F64 => "f64",
        _ => "unknown",
    }
}

impl MetadataValue {
    /// The on-disk type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            MetadataValue::U8(_) => type_id::U8,
            MetadataValue::I8(_) => type_id::I8,
            MetadataValue::U16(_) => type_id::U16,
            MetadataValue::I16(_) => type_id::I16,
            MetadataValue::U32(_) => type_id::U32,
            MetadataValue::I32(_) => type_id::I32,
            MetadataValue::U64(_) => type_id::U64,
            MetadataValue::I64(_) => type_id::I64,
            MetadataValue::F32(_) => type_id::F32,
            MetadataValue::F64(_) => type_id::F64,
            MetadataValue::Bool(_) => type_id::BOOL,
            MetadataValue::String(_) => type_id::STRING,
            MetadataValue::Array(_) => type_id::ARRAY,
        }
    }

    /// The type name (`"u32"`, `"array"`).
    pub fn type_name(&self) -> &'static str {
        type_id_name(self.type_id())
    }

    /// Any integer value as i128, so every integer type converts to every other with one
    /// `try_from` and no sign or width special cases.
    pub fn as_integer(&self) -> Option<i128> {
        match self {
            MetadataValue::U8(v) => Some(i128::from(*v)),
            MetadataValue::I8(v) => Some(i128::from(*v)),
            MetadataValue::U16(v) => Some(i128::from(*v)),
            MetadataValue::I16(v) => Some(i128::from(*v)),
            MetadataValue::U32(v) => Some(i128::from(*v)),
            MetadataValue::I32(v) => Some(i128::from(*v)),
            MetadataValue::U64(v) => Some(i128::from(*v)),
            MetadataValue::I64(v) => Some(i128::from(*v)),
            MetadataValue::F32(_)
            | MetadataValue::F64(_)
            | MetadataValue::Bool(_)
            | MetadataValue::String(_)
            | MetadataValue::Array(_) => None,
        }
    }

    /// F32 or F64 as f32 (F64 rounded); integers are not floats here, so a mistyped key shows.
    pub fn as_f32(&self) -> Option<f32> {
        match self {
            MetadataValue::F32(v) => Some(*v),
            MetadataValue::F64(v) => Some(*v as f32),
            MetadataValue::U8(_)
            | MetadataValue::I8(_)
            | MetadataValue::U16(_)
            | MetadataValue::I16(_)
            | MetadataValue::U32(_)
            | MetadataValue::I32(_)
            | MetadataValue::U64(_)
            | MetadataValue::I64(_)
            | MetadataValue::Bool(_)
            | MetadataValue::String(_)
            | MetadataValue::Array(_) => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        if let MetadataValue::String(s) = self {
            Some(s)
        } else {
            None
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        if let MetadataValue::Bool(b) = self {
            Some(*b)
        } else {
            None
        }
    }

    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        if let MetadataValue::Array(items) = self {
            Some(items)
        } else {
            None
        }
    }

    /// A short description for "expected X, found Y" messages: the type, plus the value for
    /// scalars (so an out-of-range integer shows itself) and the length and element type for
    /// arrays. Strings are not quoted in full because chat templates run to kilobytes.
    pub fn describe(&self) -> String {
        let detail = match self {
            MetadataValue::String(s) => format!(" of {} bytes", s.len()),
            MetadataValue::Array(items) => {
                let elem = items.first().map_or("unknown", MetadataValue::type_name);
                format!(" of {} {elem}", items.len())
            }
            MetadataValue::Bool(v) => format!(" {v}"),
            MetadataValue::F32(v) => format!(" {v}"),
            MetadataValue::F64(v) => format!(" {v}"),
            MetadataValue::U8(_)
            | MetadataValue::I8(_)
            | MetadataValue::U16(_)
            | MetadataValue::I16(_)
            | MetadataValue::U32(_)
            | MetadataValue::I32(_)
            | MetadataValue::U64(_)
            | MetadataValue::I64(_) => self
                .as_integer()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
        };
        format!("{}{detail}", self.type_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_type_and_value() {
        assert_eq!(MetadataValue::I32(-3).describe(), "i32 -3");
        assert_eq!(MetadataValue::U64(7).describe(), "u64 7");
        assert_eq!(
            MetadataValue::String("abc".into()).describe(),
            "string of 3 bytes"
        );
        assert_eq!(
            MetadataValue::Array(vec![MetadataValue::U8(1), MetadataValue::U8(2)]).describe(),
            "array of 2 u8"
        );
        assert_eq!(MetadataValue::Bool(true).describe(), "bool true");
        assert_eq!(MetadataValue::F32(0.5).as_f32(), Some(0.5));
        assert_eq!(MetadataValue::F64(0.25).as_f32(), Some(0.25));
        assert_eq!(MetadataValue::U8(1).as_f32(), None);
        assert_eq!(MetadataValue::I64(-1).as_integer(), Some(-1));
    }
}
