//! `general.file_type`: llama.cpp's `llama_ftype`, the dominant tensor type of a file, with the two
//! names llama.cpp prints for it (its enum name in logs, its description in llama-bench).

/// One `llama_ftype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileType {
    pub id: u64,
    /// The `LLAMA_FTYPE_` enum name without the prefix: "MOSTLY_Q4_K_M".
    pub name: &'static str,
    /// llama-bench's description: "Q4_K - Medium".
    pub description: &'static str,
}

const fn ft(id: u64, name: &'static str, description: &'static str) -> FileType {
    FileType { id, name, description }
}

/// The file types llama.cpp writes for the tensor types we know (ids 4-6 are retired upstream).
pub const FILE_TYPES: [FileType; 18] = [
    ft(0, "ALL_F32", "F32"),
    ft(1, "MOSTLY_F16", "F16"),
    ft(2, "MOSTLY_Q4_0", "Q4_0"),
    ft(3, "MOSTLY_Q4_1", "Q4_1"),
    ft(7, "MOSTLY_Q8_0", "Q8_0"),
    ft(8, "MOSTLY_Q5_0", "Q5_0"),
    ft(9, "MOSTLY_Q5_1", "Q5_1"),
    ft(10, "MOSTLY_Q2_K", "Q2_K - Medium"),
    ft(11, "MOSTLY_Q3_K_S", "Q3_K - Small"),
    ft(12, "MOSTLY_Q3_K_M", "Q3_K - Medium"),
    ft(13, "MOSTLY_Q3_K_L", "Q3_K - Large"),
    ft(14, "MOSTLY_Q4_K_S", "Q4_K - Small"),
    ft(15, "MOSTLY_Q4_K_M", "Q4_K - Medium"),
    ft(16, "MOSTLY_Q5_K_S", "Q5_K - Small"),
    ft(17, "MOSTLY_Q5_K_M", "Q5_K - Medium"),
    ft(18, "MOSTLY_Q6_K", "Q6_K"),
    ft(21, "MOSTLY_Q2_K_S", "Q2_K - Small"),
    ft(32, "MOSTLY_BF16", "BF16"),
];

impl FileType {
    /// The mix's name as `llama-quantize` (and `mixtral-q quantize --type`) takes it: "Q4_K_M".
    pub fn mix(&self) -> &'static str {
        self.name.strip_prefix("MOSTLY_").or_else(|| self.name.strip_prefix("ALL_")).unwrap_or(self.name)
    }

    /// The file type with id `id`, if llama.cpp defines it and we know it.
    pub fn from_id(id: u64) -> Option<&'static FileType> {
        FILE_TYPES.iter().find(|f| f.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_found() {
        for f in &FILE_TYPES {
            assert_eq!(FileType::from_id(f.id), Some(f));
        }
        assert_eq!(FileType::from_id(15).unwrap().name, "MOSTLY_Q4_K_M");
        assert_eq!(FileType::from_id(4), None);
        assert_eq!(FileType::from_id(12).unwrap().mix(), "Q3_K_M");
        assert_eq!(FileType::from_id(0).unwrap().mix(), "F32");
    }
}
