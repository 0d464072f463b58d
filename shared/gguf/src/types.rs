//! ggml tensor types: their on-disk ids and block geometry.
//!
//! The ids and the (block size, bytes per block) pairs are those of `ggml.h` / `ggml-common.h`.
//! Geometry is known for every type llama.cpp can write, even those we cannot dequantise, so the
//! extent of every tensor can be checked when a file is opened. Ids ggml has retired (31-33,
//! 36-38) or that are newer than this table are [`GgmlType::Other`]: a file using them is refused
//! at open, because neither its tensors' sizes nor its layout can be trusted.

use std::fmt;

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    /// An id this crate does not know.
    Other(u32),
}

/// (type, id, name, block size in elements, bytes per block). One table so the three mappings
/// cannot drift apart.
const TABLE: [(GgmlType, u32, &str, usize, usize); 34] = [
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    // ggml's block_q8_1 holds two f16 (d, s) since 2024; older Python tables still say 40 bytes.
    // It is an activation format that llama.cpp never writes to files.
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
    (GgmlType::NVFP4, 40, "NVFP4", 64, 36),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 18),
];

impl GgmlType {
    /// The type for an on-disk id; unknown ids become [`GgmlType::Other`].
    pub fn from_id(id: u32) -> GgmlType {
        TABLE
            .iter()
            .find(|row| row.1 == id)
            .map_or(GgmlType::Other(id), |row| row.0)
    }

    /// The on-disk id.
    pub fn id(self) -> u32 {
        if let GgmlType::Other(id) = self {
            id
        } else {
            // Every other variant has a row.
            Self::row(self).map_or(u32::MAX, |row| row.1)
        }
    }

    /// Elements per block (1 for plain types); `None` for [`GgmlType::Other`].
    pub fn block_size(self) -> Option<usize> {
        Self::row(self).map(|row| row.3)
    }

    /// Bytes per block; `None` for [`GgmlType::Other`].
    pub fn type_size(self) -> Option<usize> {
        Self::row(self).map(|row| row.4)
    }

    /// ggml's name for the type (`"Q4_K"`, `"BF16"`); `None` for [`GgmlType::Other`].
    pub fn name(self) -> Option<&'static str> {
        Self::row(self).map(|row| row.2)
    }

    /// Whether [`crate::dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        crate::dequant::supported(self)
    }

    fn row(ty: GgmlType) -> Option<&'static (GgmlType, u32, &'static str, usize, usize)> {
        TABLE.iter().find(|row| row.0 == ty)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown ggml type {}", self.id()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_geometry_matches_ggml() {
        for row in TABLE {
            assert_eq!(GgmlType::from_id(row.1), row.0);
            assert_eq!(row.0.id(), row.1);
        }
        assert_eq!(GgmlType::from_id(31), GgmlType::Other(31));
        assert_eq!(GgmlType::Other(31).id(), 31);
        assert_eq!(GgmlType::Other(31).block_size(), None);
        assert_eq!(GgmlType::Other(31).to_string(), "unknown ggml type 31");
        assert_eq!(GgmlType::Q4K.to_string(), "Q4_K");
        assert_eq!(GgmlType::Q6K.block_size(), Some(256));
        assert_eq!(GgmlType::Q6K.type_size(), Some(210));
        assert_eq!(GgmlType::from_id(30), GgmlType::BF16);
        assert_eq!(GgmlType::from_id(14), GgmlType::Q6K);
    }
}
