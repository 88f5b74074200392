//! Names in the mount ↔ FHIR ids: which names may ever reach the server.

/// Longest FHIR id, from the R4/R5 `id` datatype (`[A-Za-z0-9\-\.]{1,64}`).
pub const MAX_ID_LEN: usize = 64;

/// True when `name` is a FHIR id that may be sent to the server.
///
/// `.` and `..` match the FHIR pattern but are directory entries, so they are never ids here.
pub fn is_valid_id(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ID_LEN
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The id behind a file name, or `None` when the name can never be a Binary (no request is made).
pub fn id_from_name(name: &std::ffi::OsStr) -> Option<&str> {
    name.to_str().filter(|n| is_valid_id(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn accepts_fhir_ids() {
        for id in ["a", "123", "A-b.c", "f47ac10b-58cc-4372-a567-0e02b2c3d479", &"x".repeat(64)] {
            assert!(is_valid_id(id), "{id}");
        }
    }

    #[test]
    fn rejects_names_outside_the_pattern() {
        let long = "x".repeat(65);
        for name in ["", ".", "..", "a/b", "a b", "a_b", "é", "a%2F", "a\0b", &long] {
            assert!(!is_valid_id(name), "{name:?}");
        }
    }

    #[test]
    fn non_utf8_names_are_not_ids() {
        assert_eq!(id_from_name(OsStr::from_bytes(b"ab\xff")), None);
        assert_eq!(id_from_name(OsStr::new("ab")), Some("ab"));
    }
}
